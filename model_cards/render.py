"""Model cards of CMAL checkpoints, rendered from what a run recorded and measured.

    python -m cmal.model_cards.render outputs/cmal-vqa                           # kind from eval_results.json
    python -m cmal.model_cards.render outputs/cmal-mini-synthetic --kind pretraining

`templates/<kind>.md` (pretraining, and each task's: vqa, ve, nlvr2, rec, retrieval, or the template a registered
task names) extends `templates/base.md`, which holds the sections every card shares, and fills in only what its task
changes; the title, metrics and Hub tag of a task's card are its record's (`training/tasks.py`). The YAML metadata is
built here: the `model-index` comes from the measured eval results, never from typed numbers, and each
card is parsed back and checked offline (`validate_card`) before it is written.
"""

import argparse
import inspect
import json
import math
import os
import re
from pathlib import Path

import jinja2
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.repocard import REGEX_YAML_BLOCK
from huggingface_hub.repocard_data import model_index_to_eval_results
from huggingface_hub.utils import HFValidationError, validate_repo_id

from cmal.modeling_cmal.modeling_cmal import CMAL_HEAD_AUTO_CLASSES, CMAL_PIPELINE_TASKS, CMALForPreTraining
from cmal.training.data import synthetic
from cmal.training.data.region_store import METADATA_FILE
from cmal.training.tasks import TASKS


TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
SYNTHETIC_DATASET = "synthetic-scene-world"
REQUIRED_TAGS = ("cmal", "custom_code", "vision-language")
REQUIRED_TRAIN_RESULTS = ("steps", "global_batch_size", "train_seconds")
# The region settings of every world the training scripts build: `build_world`'s defaults (no flag changes them).
SYNTHETIC_REGIONS = {name: inspect.signature(synthetic.build_world).parameters[name].default
                     for name in ("box_jitter", "num_distractors", "tag_noise")}  # fmt: skip


class CardKind:
    """What a card of one checkpoint kind states beyond the shared sections: a task's record (`training/tasks.py`)
    or pre-training's. Metrics are listed main metric first: the first `model-index` entry is the one a
    leaderboard shows."""

    def __init__(self, head: type, task_name: str, template: str, metrics: tuple = (), pipeline_tag: str | None = None):
        self.head, self.task_name, self.template, self.metrics = head, task_name, template, metrics
        self.pipeline_tag = pipeline_tag
        self.auto_class = CMAL_HEAD_AUTO_CLASSES[head]
        # the task of the checkpoint's own pipeline (`config.custom_pipelines`); pre-training has none
        self.pipeline_task = CMAL_PIPELINE_TASKS[head][0] if head in CMAL_PIPELINE_TASKS else None
        # `model-index` task type: the Hub task where one fits (only VQA), else CMAL's pipeline task
        self.task_type = pipeline_tag or self.pipeline_task


def card_kinds() -> dict[str, CardKind]:
    """Pre-training's card, then one per registered task (read at each call: a task registered later counts)."""
    return {
        "pretraining": CardKind(CMALForPreTraining, "Vision-language pre-training", os.path.join(TEMPLATES, "pretraining.md")),
        **{name: CardKind(task.head, task.card_title, task.template_path, task.card_metrics, task.hub_pipeline_tag)
           for name, task in TASKS.items()},
    }  # fmt: skip


def _kind(kind: str) -> CardKind:
    kinds = card_kinds()
    if kind not in kinds:
        raise ValueError(f"`kind` must be one of {', '.join(kinds)}, got {kind!r}")
    return kinds[kind]


def dataset_name(training_args: dict) -> str:
    """The training data as a card names it: the synthetic world, or the file or folder it was read from."""
    source = training_args.get("train_file") or training_args.get("dataset")
    return SYNTHETIC_DATASET if source in (None, "synthetic") else os.path.basename(os.path.normpath(source))


def hub_repo_id(name: str | None, root: str = ".") -> str | None:
    """The Hub repo `name` stands for, None if none: `base_model` must link to a repo on the Hub.

    A Hub id stands for itself. A local folder (a relative path is looked up under `root`, where training
    ran, since `owner/name` and `folder/name` read the same) stands for the namespaced repo it was pushed
    to, as its `train_results.json` records (`hub_model_id`), else for nothing.
    """
    if not name:
        return None
    folder = os.path.join(root, os.path.expanduser(name))
    if os.path.exists(folder):
        pushed = ((_read_json(os.path.join(folder, "train_results.json")) or {}).get("args") or {}).get("hub_model_id")
        return pushed if pushed and "/" in pushed and _is_repo_id(pushed) else None
    return name if _is_repo_id(name) else None


def _source(name: str | None, base_model: str | None) -> str:
    """Where weights came from, as a card states it: a Hub link, or a local folder by its name only (a card
    is published: a path on the training machine resolves nowhere else)."""
    if not name:
        return "random weights"
    local = f"the local folder `{os.path.basename(os.path.normpath(name))}`"
    if base_model:
        hub = f"[`{base_model}`](https://huggingface.co/{base_model})"
        return hub if name == base_model else f"{hub} ({local})"
    return local + " (not on the Hub)"


def _is_repo_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _eval_results(kind: str, eval_results: dict, dataset: str) -> list[EvalResult]:
    """The `model-index` entries of the measured metrics, values exactly as measured."""
    spec = _kind(kind)
    entries = []
    for metric in spec.metrics:
        value = eval_results.get(metric.key)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(
                f"eval_results[{metric.key!r}] ({metric.name}) must be a finite number for a {kind} card, got "
                f"{value!r}; eval_results has {sorted(eval_results)}"
            )
        entries.append(EvalResult(task_type=spec.task_type, task_name=spec.task_name, dataset_type=dataset,
                                  dataset_name=dataset, dataset_split="validation", metric_type=metric.type,
                                  metric_name=metric.name, metric_value=float(value)))  # fmt: skip
    return entries


# The texts of the snippets: a checkpoint of the synthetic world knows only its words (a word-level vocabulary),
# so its card asks what its training asked; a checkpoint of real data, what a photo's user would.
SYNTHETIC_EXAMPLES = {"question": "what colour is the large ring?", "caption": "a blue ring is to the left of a large red cube.",
                      "hypothesis": "the small ring is purple.", "expression": "the large blue ring left of the large green orb",
                      "sentence": "both images contain a ball.", "texts": ["a blue ring is to the left of a large red cube.", "a block above a blue ring."]}
PHOTO_EXAMPLES = {"question": "what is on the table?", "caption": "two dogs play with a frisbee",
                  "hypothesis": "two dogs are playing outside", "expression": "the dog on the left",
                  "sentence": "the left image has more dogs than the right one", "texts": ["a dog catching a frisbee", "a plate of food"]}  # fmt: skip


def _text_limit(folder: str, config: dict) -> str:
    """How much text the checkpoint reads, as its pipeline counts it: the tokenizer's `model_max_length` (fine-tuning's
    `--max_text_length`) capped by the position embeddings; "words" for a word-level vocabulary (no `##` pieces)."""
    tokenizer = _read_json(os.path.join(folder, "tokenizer_config.json")) or {}
    length = min(tokenizer.get("model_max_length") or math.inf, config["max_position_embeddings"])
    vocab = ((_read_json(os.path.join(folder, "tokenizer.json")) or {}).get("model") or {}).get("vocab") or {"##": 0}
    pieces = any(token.startswith("##") for token in vocab)
    return f"{length} {'word pieces' if pieces else 'whole words'} ([CLS] and [SEP] included)"


def _regions(folder: str, config: dict, training_args: dict, root: str) -> dict:
    """Where the checkpoint's regions come from: its own detector (with the metrics it measured in training when
    the folder ships them, `detector_results.json`), else the region store it was trained on (with the store's
    provenance when the store is at hand) or the synthetic world."""
    store = training_args.get("regions")
    if store is None and training_args.get("dataset") not in (None, "synthetic"):
        store = os.path.join(training_args["dataset"], "regions")
    provenance = {}
    if store and os.path.isfile(os.path.join(root, store, METADATA_FILE)):
        with open(os.path.join(root, store, METADATA_FILE)) as f:
            provenance = json.load(f)
    detector = config.get("detector_config")
    if detector:
        weights = detector.get("_name_or_path") or None
        measured = _read_json(os.path.join(folder, "detector_results.json")) or {}
        detector = {"type": detector["model_type"], "weights": weights and _source(weights, hub_repo_id(weights, root)),
                    "validation": measured.get("validation") if "map_50" in (measured.get("validation") or {}) else None}  # fmt: skip
    return {
        "feature_dim": config["visual_feat_dim"],
        "concepts": list(config["concept_names"]),
        "detector": detector,
        "store": store,
        "store_source": provenance.get("source"),
        "store_detector": provenance.get("detector"),
    }


def render_model_card(
    folder: str,
    kind: str,
    config,
    training_args: dict,
    train_results: dict,
    eval_results: dict | None,
    base_model: str | None,
    dataset_name: str,
    root: str = ".",
    repo_id: str | None = None,
) -> ModelCard:
    """The model card of a checkpoint folder, checked with `validate_card`.

    Args:
        folder: the checkpoint folder; its name is the model's name unless `training_args["hub_model_id"]`.
        kind: one of `card_kinds()`: "pretraining" or a task's name.
        config: the model's `CMALConfig` or its `config.json` as a dict.
        training_args: the run's arguments (`train_results.json["args"]`).
        train_results: steps, global batch, seconds (and, for pre-training, the losses) of the run.
        eval_results: the measured validation metrics (`eval_results.json`), None when nothing was evaluated.
        base_model: the Hub repo it started from, None for a local checkpoint or random weights (`hub_repo_id`
            tells them apart); the body names whatever `training_args` started from.
        dataset_name: the training data's name (`dataset_name(training_args)`).
        root: the directory training ran in, against which relative paths in `training_args` are resolved.
        repo_id: the namespaced Hub repo the card is for (default `training_args["hub_model_id"]`); without
            one, the snippets name `<your-namespace>/<folder name>`.
    """
    spec = _kind(kind)
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    if base_model is not None and not _is_repo_id(base_model):
        raise ValueError(f"`base_model` must be a Hub repo id or None (a local path cannot be linked), got {base_model!r}")
    missing = [key for key in REQUIRED_TRAIN_RESULTS if key not in train_results]
    if missing:
        raise ValueError(f"train_results lacks {', '.join(missing)}, which the card's training section reports")
    repo_id = repo_id or training_args.get("hub_model_id")
    model_name = (repo_id or os.path.basename(os.path.abspath(folder))).split("/")[-1]
    index = _eval_results(kind, eval_results, dataset_name) if eval_results and spec.metrics else None
    data = ModelCardData(
        language="en",
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag=spec.pipeline_tag,
        tags=[*REQUIRED_TAGS, kind, *([spec.task_type] if spec.task_type else [])],
        datasets=[dataset_name],
        metrics=sorted({metric.type for metric in spec.metrics}) or None,
        base_model=base_model,
        model_name=model_name if index else None,  # only the `model-index` uses it
        eval_results=index,
    )  # no `widget`: the Hub's widgets do not run custom code (the card points to the Space and Endpoint)
    regions = _regions(folder, config, training_args, root)
    card = ModelCard.from_template(
        data,
        template_path=spec.template,
        base=jinja2.Template(Path(TEMPLATES, "base.md").read_text(encoding="utf-8")),
        kind=kind,
        spec=spec,
        model_name=model_name,
        repo_id=repo_id if repo_id and "/" in repo_id else f"<your-namespace>/{model_name}",
        config=config,
        args=training_args,
        results=train_results,
        evaluation=eval_results or {},
        metrics=[{"name": e.metric_name, "value": e.metric_value} for e in index or []],
        init_from=_source(training_args.get("model_name_or_path") or training_args.get("init_text_from"), base_model),
        epochs=train_results["steps"] / train_results["steps_per_epoch"] if train_results.get("steps_per_epoch") else None,
        synthetic_regions=SYNTHETIC_REGIONS,
        dataset_name=dataset_name,
        synthetic=dataset_name == SYNTHETIC_DATASET,
        regions=regions,
        # the main metric per group of held-out items (VQA's question types): `<metric>/<group>` in eval_results
        text_limit=_text_limit(folder, config),
        by_group={key.split("/", 1)[1]: value for key, value in (eval_results or {}).items() if "/" in key},
        example=SYNTHETIC_EXAMPLES if dataset_name == SYNTHETIC_DATASET else PHOTO_EXAMPLES,
        # the visual argument of the snippets: raw images through the checkpoint's detector, else region dicts
        visual_one="image" if regions["detector"] else "regions",
        visual_key="images" if regions["detector"] else "regions",
    )
    # Jinja leaves the blank lines of skipped blocks behind; Markdown needs at most one.
    card = ModelCard(re.sub(r"\n{3,}", "\n\n", card.content).strip() + "\n")
    validate_card(card, kind, eval_results)
    return card


def validate_card(card: ModelCard, kind: str, eval_results: dict | None = None) -> ModelCardData:
    """Parse a card's YAML back and check what the Hub and users rely on; returns the parsed metadata.

    Offline, unlike `ModelCard.validate` (which asks the Hub). With `eval_results`, the `model-index`
    must hold every metric of the kind with exactly the measured value, both as written and as
    `ModelCardData` reads it back. Raises `ValueError` naming the field at fault.
    """
    spec = _kind(kind)
    match = REGEX_YAML_BLOCK.search(card.content)
    if match is None:
        raise ValueError("model card has no YAML metadata block")
    raw = yaml.safe_load(match.group(2)) or {}
    data = ModelCard(card.content).data

    def check(field: str, ok: bool, expected: str) -> None:
        if not ok:
            raise ValueError(f"model card field `{field}`: expected {expected} for a {kind} card, got {raw.get(field)!r}")

    check("library_name", data.library_name == "transformers", "'transformers'")
    check("license", data.license == "apache-2.0", "'apache-2.0'")
    check("tags", set(REQUIRED_TAGS) | {kind} <= set(data.tags or []), f"tags including {[*REQUIRED_TAGS, kind]}")
    check("pipeline_tag", data.pipeline_tag == spec.pipeline_tag, repr(spec.pipeline_tag))
    check("datasets", bool(data.datasets), "the training dataset")
    check("base_model", data.base_model is None or _is_repo_id(data.base_model), "a Hub repo id or nothing")
    check("widget", "widget" not in raw, "none (the Hub's widgets cannot run a custom-code model)")
    for snippet in ("trust_remote_code=True", "revision="):
        if snippet not in card.text:
            raise ValueError(f"model card body: the loading snippet lacks `{snippet}`")
    if not (eval_results and spec.metrics):
        return data
    check("model-index", bool(raw.get("model-index")), "results from eval_results")
    _, written = model_index_to_eval_results(raw["model-index"])
    if written != data.eval_results:
        raise ValueError("model card field `model-index`: does not round-trip through ModelCardData.eval_results")
    by_name = {entry.metric_name: entry for entry in written}
    for expected in _eval_results(kind, eval_results, data.datasets[0]):
        entry = by_name.get(expected.metric_name)
        if entry is None:
            raise ValueError(f"model card field `model-index`: no {expected.metric_name!r} result, though eval_results has it")
        if entry != expected:
            raise ValueError(f"model card field `model-index`: {expected.metric_name!r} is {entry}, expected {expected}")
    return data


def write_model_card(folder: str, *args, **kwargs) -> str:
    """Render (`render_model_card`, same arguments) and save `folder/README.md` atomically; returns its path.

    The card is written to a temporary file and renamed, so a killed run never leaves half a README.
    """
    card = render_model_card(folder, *args, **kwargs)
    path = os.path.join(folder, "README.md")
    card.save(path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def _training_root(folder: str, output_dir: str | None) -> str | None:
    """The directory the run was launched from: `folder` minus the `--output_dir` it was given, so paths
    the run recorded relative to it still resolve; None once the folder has moved."""
    folder = os.path.abspath(folder)
    suffix = os.sep + os.path.normpath(output_dir or "")
    if not output_dir or os.path.isabs(output_dir) or not folder.endswith(suffix):
        return None
    return folder[: -len(suffix)] or os.sep


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def render_folder(folder: str, kind: str | None = None, repo_id: str | None = None) -> str:
    """Re-render `folder/README.md` from its config.json, train_results.json and eval_results.json (for the
    Hub repo `repo_id`, e.g. the one it is being pushed to)."""
    config = _read_json(os.path.join(folder, "config.json"))
    train_results = _read_json(os.path.join(folder, "train_results.json"))
    if config is None or train_results is None:
        raise ValueError(f"{folder!r} needs config.json and train_results.json (written by the training scripts)")
    eval_results = _read_json(os.path.join(folder, "eval_results.json"))
    training_args = train_results.pop("args", {})
    if kind is None:
        kind = (eval_results or {}).get("task") or training_args.get("task")
    if kind is None:
        heads = {spec.head.__name__: name for name, spec in reversed(card_kinds().items())}  # a head's first kind
        kind = heads.get((config.get("architectures") or [None])[0])
    if kind is None:
        raise ValueError(f"cannot tell the kind of {folder!r} from its files: pass --kind ({', '.join(card_kinds())})")
    root = _training_root(folder, training_args.get("output_dir"))
    # Once the folder has moved, `owner/name` may as well be a local path: no `base_model` then.
    start = training_args.get("model_name_or_path") or training_args.get("init_text_from")
    base_model = hub_repo_id(start, root) if root is not None else None
    return write_model_card(folder, kind, config, training_args, train_results, eval_results, base_model,
                            dataset_name(training_args), root=root or ".", repo_id=repo_id)  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="A checkpoint folder written by training/pretrain.py or training/finetune.py.")
    parser.add_argument("--kind", choices=list(card_kinds()), default=None,
                        help="Default: eval_results.json's task, else the head in config.json's `architectures`.")  # fmt: skip
    args = parser.parse_args(argv)
    print(f"model card written to {render_folder(args.folder, args.kind)}")


if __name__ == "__main__":
    main()
