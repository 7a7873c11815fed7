"""What of a training folder goes to the Hub, checked before anything is sent (`hub_files`), and the upload itself
(`push_to_hub`): one commit of an allowlist, the card first rendered for the repo's real name."""

import json
import logging
import os

from cmal.training.run_folder import DETECTOR_RESULTS


logger = logging.getLogger(__name__)


# What a model repo may hold besides the weights and code: configs, processor and tokenizer files, the card,
# the run's results and the Inference Endpoint handler. Nothing else is ever uploaded.
HUB_FILES = {
    "config.json", "generation_config.json", "processor_config.json", "preprocessor_config.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt", "README.md",
    "train_results.json", "eval_results.json", DETECTOR_RESULTS, "handler.py", "requirements.txt",
}  # fmt: skip


def hub_files(folder: str) -> list[str]:
    """The files of `folder` that make its Hub repo: an allowlist, after checking nothing a user needs is missing.

    Uploaded: the weights (checked to be whole safetensors files, every shard the index names with
    exactly its tensors), `HUB_FILES`, and the code files an `auto_map` or `custom_pipelines` entry
    names with the files those import (`from .x import`): a repo loads with `trust_remote_code=True`
    only if all are there. Never uploaded: anything else (dotfiles, logs, checkpoints, unfinished
    `.tmp` writes), symlinks, and anything resolving outside the folder. Raises `ValueError` naming
    each missing or broken file.
    """
    from transformers.dynamic_module_utils import get_relative_imports

    if not os.path.isdir(folder):
        raise ValueError(f"expected a model folder to upload, got {folder!r} (not a directory)")
    root = os.path.realpath(folder)
    present = {name for name in os.listdir(folder) if os.path.isfile(os.path.join(folder, name))}
    needed = {"config.json": "the model config", "processor_config.json": "the processor", "README.md": "the model card"}
    if "model.safetensors.index.json" in present:
        weights = shard_map(os.path.join(folder, "model.safetensors.index.json"))
        needed |= {"model.safetensors.index.json": "the shard index"} | {shard: "a weight shard" for shard in weights}
    else:
        weights = {"model.safetensors": None}
        needed["model.safetensors"] = "the weights"
    if "tokenizer.json" not in present and "vocab.txt" not in present:
        needed["tokenizer.json"] = "the tokenizer"
    for config_file in ("config.json", "processor_config.json", "tokenizer_config.json"):
        if config_file in present:
            for module in code_files(os.path.join(folder, config_file)):
                needed.setdefault(module, f"code named in {config_file}")
    modules = [name for name in needed if name.endswith(".py")]
    for module in modules:  # grows as imports are found
        if module in present:
            for imported in get_relative_imports(os.path.join(folder, module)):
                if imported + ".py" not in needed:
                    needed[imported + ".py"] = f"code imported by {module}"
                    modules.append(imported + ".py")
    missing = [f"{name} ({why})" for name, why in needed.items() if name not in present]
    if missing:
        raise ValueError(f"{folder!r} is not a complete model folder, so it is not uploaded: missing {', '.join(missing)}")
    selected = sorted(name for name in present if name in needed or name in HUB_FILES)
    for name in selected:
        path = os.path.join(folder, name)
        if os.path.islink(path) or os.path.dirname(os.path.realpath(path)) != root:
            raise ValueError(f"{path} is a link (to {os.path.realpath(path)}): only files inside the folder are uploaded; "
                             "copy the file in")  # fmt: skip
    for name, keys in weights.items():
        check_safetensors(os.path.join(folder, name), keys)
    return selected


def code_files(config_path: str) -> list[str]:
    """The `.py` files a config's `auto_map` and `custom_pipelines` entries name."""
    with open(config_path) as f:
        config = json.load(f)
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    references = list((config.get("auto_map") or {}).values())
    references += [p["impl"] for p in (config.get("custom_pipelines") or {}).values()]
    references = [r[0] if isinstance(r, list) else r for r in references]  # tokenizers: [slow, fast]
    return [r.split("--")[-1].rsplit(".", 1)[0] + ".py" for r in references if r]


def shard_map(index_path: str) -> dict[str, set]:
    """{shard file: the tensor names the index puts in it} of a `model.safetensors.index.json`."""
    with open(index_path) as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path}: expected a non-empty `weight_map` object")
    shards = {}
    for tensor, shard in weight_map.items():
        if os.path.basename(shard) != shard:
            raise ValueError(f"{index_path}: shard {shard!r} of {tensor!r} is not a file name in the folder")
        shards.setdefault(shard, set()).add(tensor)
    return shards


def check_safetensors(path: str, keys: set | None = None) -> None:
    """A whole safetensors file (header and data; a cut-short write fails here) holding exactly `keys`."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            stored = set(f.keys())
    except SafetensorError as error:
        raise ValueError(f"{path} is not a complete safetensors file ({error}), so it is not uploaded") from None
    if keys is not None and stored != keys:
        raise ValueError(f"{path} holds {len(stored)} tensors but the shard index names {len(keys)} for it "
                         f"(e.g. {sorted(stored ^ keys)[:3]}): the shards and their index disagree")  # fmt: skip


def push_to_hub(folder: str, repo_id: str | None = None, private: bool | None = None, commit_message: str | None = None):
    """Upload a checked training folder (`hub_files`) in one commit; returns the commit info.

    A card the training scripts wrote (the folder has `train_results.json`) is first rendered again for the
    repo as the Hub names it (`owner/name`, also when `repo_id` was given without the owner), so that its
    snippets load this very repo."""
    from huggingface_hub import CommitOperationAdd, HfApi

    from cmal.model_cards.render import render_folder

    files = hub_files(folder)
    repo_id = repo_id or os.path.basename(os.path.abspath(folder))
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if os.path.isfile(os.path.join(folder, "train_results.json")):
        render_folder(folder, repo_id=repo_id)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(folder, name)) for name in files]
    info = api.create_commit(repo_id, operations=operations, commit_message=commit_message or f"Upload CMAL from {folder}")
    logger.info(f"uploaded {len(files)} files to {repo_id}: {info.commit_url}")
    return info
