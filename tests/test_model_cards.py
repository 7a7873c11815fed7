"""Model cards: every checkpoint kind renders a card whose YAML parses back to the measured numbers."""

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config
from huggingface_hub import ModelCard
from test_detector import cmal_config

from cmal.model_cards import render
from cmal.model_cards.render import card_kinds, hub_repo_id, render_model_card, validate_card, write_model_card
from cmal.training import finetune, pretrain
from cmal.training.data import synthetic
from cmal.training.tasks import TASKS


LABELS = {"vqa": ["yes", "no", "two"], "ve": ["entailment", "neutral", "contradiction"], "nlvr2": ["false", "true"],
          "retrieval": ["no match", "match"]}  # fmt: skip
RECALLS = {f"{d}_r{k}": 100 * k / 11 for d in ("text_to_image", "image_to_text") for k in (1, 5, 10)}
EVAL = {
    "vqa": {"vqa_accuracy": 0.1234567891234},
    "ve": {"accuracy": 2 / 3, "per_class_accuracy": [1.0, 0.5, 0.5]},
    "nlvr2": {"accuracy": 0.55},
    "rec": {"accuracy": 0.4, "mean_iou": 1 / 3},
    "retrieval": {**RECALLS, "rsum": sum(RECALLS.values())},
}


def config_for(kind):
    labels = LABELS.get(kind)
    return tiny_config(id2label=dict(enumerate(labels))) if labels else tiny_config()


def args_for(kind, *extra):
    """The real scripts' arguments, so a renamed flag breaks the card test rather than a user's card."""
    args = pretrain.parse_args(list(extra)) if kind == "pretraining" else finetune.parse_args(["--task", kind, *extra])
    return vars(args)


def train_results_for(kind):
    results = {"steps": 7, "steps_per_epoch": 3, "global_batch_size": 32, "train_seconds": 12.5}  # 32 per device, 1 process
    if kind == "pretraining":
        losses = {"mlm_loss": 4.0, "amc_token_loss": 3.0, "loss": 7.0}
        results.update(first_losses=losses, final_losses={name: value / 2 for name, value in losses.items()})
    return results


def eval_for(kind):
    return None if kind == "pretraining" else {"task": kind, "eval_loss": 0.7, **EVAL[kind], "eval_samples": 12}


def stated_facts(text: str) -> dict:
    """What a card's body states about the run, read back off the Markdown."""
    facts = {}
    if steps := re.search(r"\| optimizer steps \| (\d+)(?: = ([\d.]+) epochs of (\d+) steps| \(epochs not recorded\))", text):
        facts["steps"], facts["epochs"], facts["steps_per_epoch"] = steps.groups()
    facts["global_batch_size"] = re.search(r"\| global batch \| (\d+) = ", text).group(1)
    facts["train_seconds"] = re.search(r"\| compute \| (\d+) s of training", text).group(1)
    facts["metrics"] = dict(re.findall(r"^\| ([^|]+) \| (\d+\.\d{4}) \|$", text, re.M))
    facts["losses"] = {name: (first, last) for name, first, last in re.findall(r"^\| (\w+_loss|loss) \| (\S+) \| (\S+) \|$", text, re.M)}
    if itm := re.search(r"accuracy (\S+), ROC AUC (\S+) over (\d+) pairs", text):
        facts["itm"] = itm.groups()
    return facts


def expected_facts(train_results: dict, eval_results: dict | None, kind: str) -> dict:
    """The same facts, formatted from train_results.json / eval_results.json as the card must state them."""
    per_epoch = train_results.get("steps_per_epoch")
    facts = {"steps": str(train_results["steps"]), "epochs": f"{train_results['steps'] / per_epoch:.2f}" if per_epoch else None,
             "steps_per_epoch": str(per_epoch) if per_epoch else None, "global_batch_size": str(train_results["global_batch_size"]),
             "train_seconds": f"{train_results['train_seconds']:.0f}",
             "metrics": {m.name: f"{eval_results[m.key]:.4f}" for m in card_kinds()[kind].metrics} if eval_results else {},
             "losses": {name: (f"{train_results['first_losses'][name]:.4f}" if train_results.get("first_losses") else "—", f"{value:.4f}")
                        for name, value in (train_results.get("final_losses") or {}).items()} if kind == "pretraining" else {}}  # fmt: skip
    if (validation := train_results.get("validation")) and validation.get("itm_pairs"):
        facts["itm"] = (f"{validation['itm_accuracy']:.4f}", f"{validation['itm_auc']:.4f}", str(validation["itm_pairs"]))
    return facts


def render_kind(kind, folder, base_model=None, **overrides):
    values = dict(config=config_for(kind), training_args=args_for(kind), train_results=train_results_for(kind),
                  eval_results=eval_for(kind), base_model=base_model, dataset_name="synthetic-scene-world")  # fmt: skip
    values.update(overrides)
    return render_model_card(str(folder), kind, **values)


@pytest.mark.parametrize("kind", list(card_kinds()))
def test_card_metadata_and_body(kind, tmp_path):
    folder = tmp_path / f"cmal-{kind}"
    folder.mkdir()
    write_model_card(str(folder), kind, config_for(kind), args_for(kind), train_results_for(kind), eval_for(kind),
                     "google-bert/bert-base-uncased", "synthetic-scene-world")  # fmt: skip
    assert sorted(os.listdir(folder)) == ["README.md"]  # written atomically, no .tmp left
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.license == "apache-2.0"
    assert {"custom_code", "cmal", "vision-language", kind} <= set(data.tags)
    assert data.pipeline_tag == ("visual-question-answering" if kind == "vqa" else None)
    assert data.base_model == "google-bert/bert-base-uncased" and data.datasets == ["synthetic-scene-world"]
    spec = card_kinds()[kind]
    assert f"{spec.auto_class}.from_pretrained(repo_id, revision=revision, trust_remote_code=True)" in card.text
    if spec.pipeline_task:
        assert f'pipeline("{spec.pipeline_task}", model=repo_id, revision=revision, trust_remote_code=True)' in card.text
    if kind == "pretraining":
        assert data.eval_results is None and "accelerate launch training/finetune.py --task" in card.text
        assert "| mlm_loss | 4.0000 | 2.0000 |" in card.text
    else:
        # exactly the measured values, main metric first (what a leaderboard shows)
        measured = [(e.metric_type, e.metric_value) for e in data.eval_results]
        assert measured == [(m.type, eval_for(kind)[m.key]) for m in spec.metrics]
        assert data.eval_results[0].metric_value == eval_for(kind)[TASKS[kind].main_metric]
        assert {e.dataset_split for e in data.eval_results} == {"validation"} and data.eval_results[0].task_type == spec.task_type
        assert data.metrics and set(data.metrics) == {m.type for m in spec.metrics}
    assert "widget" not in data.to_dict()  # a Hub widget cannot run a custom-code model
    assert f'repo_id, revision = "<your-namespace>/cmal-{kind}", "main"' in card.text  # no bare name posing as a repo id
    assert stated_facts(card.text) == expected_facts(train_results_for(kind), eval_for(kind), kind)
    assert "@inproceedings" in card.text and "2410.12595" in card.text and "\n\n\n" not in card.content
    assert validate_card(card, kind, eval_for(kind)).tags == data.tags


def test_markdown_tables_are_unbroken(tmp_path):
    lines = render_kind("retrieval", tmp_path).text.splitlines()
    start = lines.index("| metric | value |")
    assert [line.startswith("|") for line in lines[start : start + 9]] == [True] * 9 and lines[start + 9] == ""


def test_synthetic_regions_are_described_as_the_world_made_them(tmp_path):
    """The world's own store says how its regions were made (jittered boxes, distractors, noisy tags): so must the card."""
    made = json.loads(Path(synthetic.default_world(num_images=60, seed=0), "regions", "cmal_region_store.json").read_text())["detector"]
    text = " ".join(render_kind("ve", tmp_path).text.split())
    assert (f"each object's box moved by up to {round(100 * made['box_jitter'])}% of its size per side, {made['num_distractors']} "
            f"random distractor boxes per image, {round(100 * made['tag_noise'])}% of the tags replaced by another shape") in text
    assert "ground-truth boxes" not in text


@pytest.mark.parametrize("validation", [None, {"itm_accuracy": 0.5, "itm_auc": 0.5123, "itm_pairs": 40}])
def test_the_itm_score_claims_only_what_was_measured(tmp_path, validation):
    results = {**train_results_for("pretraining"), **({"validation": validation} if validation else {})}
    card = render_kind("pretraining", tmp_path, train_results=results)
    assert "probability that the text describes the image" not in card.text
    if validation:
        assert "higher: more likely a match (held-out ROC AUC 0.51; not a calibrated probability)" in card.text
        assert stated_facts(card.text)["itm"] == ("0.5000", "0.5123", "40")
    else:
        assert "(not measured on held-out pairs: no validation split)" in card.text and "No validation split" in card.text


def test_epochs_come_from_the_steps_run(tmp_path):
    """300 steps of 333 per epoch are 0.90 epochs, whatever `--num_train_epochs` asked for."""
    args = args_for("vqa", "--num_train_epochs", "4", "--max_train_steps", "300")
    results = {**train_results_for("vqa"), "steps": 300, "steps_per_epoch": 333}
    card = render_kind("vqa", tmp_path, training_args=args, train_results=results)
    assert "| optimizer steps | 300 = 0.90 epochs of 333 steps, stopped at `--max_train_steps 300` |" in card.text
    del results["steps_per_epoch"]  # a folder of an older version: no claim
    assert "| optimizer steps | 300 (epochs not recorded)" in render_kind("vqa", tmp_path, train_results=results).text


def test_base_model_only_for_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "outputs/pre" is read where the user runs finetune.py, not in the clone's own outputs/
    (tmp_path / "outputs" / "pre").mkdir(parents=True)
    assert hub_repo_id("google-bert/bert-base-uncased", str(tmp_path)) == "google-bert/bert-base-uncased"
    assert hub_repo_id("outputs/pre", str(tmp_path)) is None  # reads like owner/name, but is a folder there
    assert hub_repo_id(str(tmp_path / "outputs" / "pre")) is None and hub_repo_id(None) is None
    assert render_kind("vqa", tmp_path).data.base_model is None
    # a local folder that was pushed (its train_results.json records the namespaced repo) stands for that repo
    (tmp_path / "outputs" / "pre" / "train_results.json").write_text(json.dumps({"args": {"hub_model_id": "me/cmal-pre"}}))
    assert hub_repo_id("outputs/pre", str(tmp_path)) == "me/cmal-pre"
    args = args_for("vqa", "--model_name_or_path", "outputs/pre")
    card = render_kind("vqa", tmp_path, training_args=args, base_model="me/cmal-pre", root=str(tmp_path))
    assert card.data.base_model == "me/cmal-pre"
    assert "| initialised from | [`me/cmal-pre`](https://huggingface.co/me/cmal-pre) (the local folder `pre`) |" in card.text
    with pytest.raises(ValueError, match="`base_model` must be a Hub repo id"):
        render_kind("vqa", tmp_path, base_model="../outputs/pre")


def test_missing_metric_is_named(tmp_path):
    results = eval_for("retrieval")
    del results["text_to_image_r5"]
    with pytest.raises(ValueError, match=r"eval_results\['text_to_image_r5'\] \(Text-to-image R@5 \(%\)\)"):
        render_kind("retrieval", tmp_path, eval_results=results)
    with pytest.raises(ValueError, match="train_results lacks train_seconds"):
        render_kind("vqa", tmp_path, train_results={"steps": 1, "global_batch_size": 2})
    with pytest.raises(ValueError, match="`kind` must be one of"):
        render_model_card(str(tmp_path), "captioning", tiny_config(), {}, {}, None, None, "x")


def edit_metadata(card, edit) -> ModelCard:
    _, header, body = card.content.split("---\n", 2)
    metadata = yaml.safe_load(header)
    edit(metadata)
    return ModelCard(f"---\n{yaml.safe_dump(metadata, sort_keys=False)}---\n{body}")


def test_validation_names_the_field(tmp_path):
    card = render_kind("vqa", tmp_path)
    with pytest.raises(ValueError, match="`pipeline_tag`: expected 'visual-question-answering'"):
        validate_card(edit_metadata(card, lambda m: m.pop("pipeline_tag")), "vqa")
    with pytest.raises(ValueError, match="`widget`: expected none"):
        validate_card(edit_metadata(card, lambda m: m.update(widget=[{"src": "cats.jpg", "text": "how many cats?"}])), "vqa")
    with pytest.raises(ValueError, match="`tags`"):
        validate_card(edit_metadata(card, lambda m: m["tags"].remove("custom_code")), "vqa")

    def change_value(metadata):
        metadata["model-index"][0]["results"][0]["metrics"][0]["value"] = 0.5

    with pytest.raises(ValueError, match="`model-index`: 'VQA accuracy' is"):
        validate_card(edit_metadata(card, change_value), "vqa", eval_for("vqa"))
    with pytest.raises(ValueError, match="`model-index`: expected results"):
        validate_card(edit_metadata(card, lambda m: m.pop("model-index")), "vqa", eval_for("vqa"))
    with pytest.raises(ValueError, match="lacks `revision=`"):
        validate_card(ModelCard(card.content.replace("revision=", "rev=")), "vqa")


def test_detector_and_region_store_provenance(tmp_path, monkeypatch):
    config = cmal_config().to_dict()
    config["detector_config"]["_name_or_path"] = "PekingU/rtdetr_r50vd"
    card = render_kind("vqa", tmp_path, config=config)
    assert "`rt_detr`, weights from [`PekingU/rtdetr_r50vd`](https://huggingface.co/PekingU/rtdetr_r50vd))" in card.text
    assert 'pipe(image=image, question="' in card.text and "images=[image]" in card.text
    # trained on the synthetic world through that detector: said so, and where to try it instead of a widget
    assert "its regions were the detector's detections of the\nworld's rendered images, not the world's own boxes" in card.text
    assert "Gradio Space of the CMAL project (`examples/space/app.py`" in card.text
    assert "Space" not in render_kind("vqa", tmp_path).text  # no detector: nothing a Space could read a photo with

    # a local detector folder (what training/train_detector.py writes): its name only; the mAP it measured only when
    # the checkpoint ships it (detector_results.json, which save_final carries), never read from the training machine
    detector = tmp_path / "runs" / "detector-synthetic"
    detector.mkdir(parents=True)
    measured = {"validation": {"map_50": 0.9574, "map_50_95": 0.8039, "images": 200}}
    (detector / "eval_results.json").write_text(json.dumps(measured))
    config["detector_config"]["_name_or_path"] = str(detector)
    card = render_kind("vqa", tmp_path, config=config)
    assert "weights from the local folder `detector-synthetic` (not on the Hub)), saved in the same `model.safetensors`. " in " ".join(card.text.split())
    assert "mAP" not in card.text
    (tmp_path / "detector_results.json").write_text(json.dumps(measured))
    card = render_kind("vqa", tmp_path, config=config)
    assert ("weights from the local folder `detector-synthetic` (not on the Hub)), saved in the same `model.safetensors` "
            "(COCO mAP@0.5 0.957, mAP@[.5:.95] 0.804 on 200 held-out images") in " ".join(card.text.split())
    assert str(tmp_path) not in card.content  # no path of the training machine is published

    store = tmp_path / "regions"
    store.mkdir()
    (store / "cmal_region_store.json").write_text(json.dumps({"source": "bottom-up-attention tsv", "detector": None}))
    (tmp_path / "snli_ve_train.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)  # the run's relative paths, as given on its command line
    args = args_for("ve", "--train_file", "snli_ve_train.jsonl", "--regions", "regions")
    card = render_kind("ve", tmp_path, training_args=args, dataset_name=render.dataset_name(args), root=str(tmp_path))
    assert "region store `regions` (source: bottom-up-attention tsv)" in card.text
    assert card.data.datasets == ["snli_ve_train.jsonl"] and "synthetic scene world" not in card.text
    assert 'pipe(regions=regions, hypothesis="' in card.text


def save_run(folder, kind, output_dir, **arg_overrides):
    """A checkpoint folder as the training scripts leave it (minus the weights)."""
    folder.mkdir(parents=True)
    config = config_for(kind)
    config.architectures = [card_kinds()[kind].head.__name__]
    config.save_pretrained(folder)
    args = {**args_for(kind), "output_dir": output_dir, **arg_overrides}
    (folder / "train_results.json").write_text(json.dumps({**train_results_for(kind), "args": args}))
    if kind != "pretraining":
        (folder / "eval_results.json").write_text(json.dumps(eval_for(kind)))


def test_cli_rerenders_a_folder(tmp_path, capsys):
    (tmp_path / "outputs" / "pre").mkdir(parents=True)
    save_run(tmp_path / "outputs" / "vqa", "vqa", "outputs/vqa", model_name_or_path="outputs/pre")
    render.main([str(tmp_path / "outputs" / "vqa")])  # kind from eval_results.json
    assert "model card written to" in capsys.readouterr().out
    card = ModelCard.load(tmp_path / "outputs" / "vqa" / "README.md")
    # outputs/pre is a folder beside the run, not a Hub repo
    assert card.data.base_model is None and "| initialised from | the local folder `pre` (not on the Hub) |" in card.text
    assert [e.metric_value for e in card.data.eval_results] == [EVAL["vqa"]["vqa_accuracy"]]

    save_run(tmp_path / "pre", "pretraining", "pre", init_text_from="google-bert/bert-base-uncased")
    render.main([str(tmp_path / "pre")])  # kind from config.json's architectures
    card = ModelCard.load(tmp_path / "pre" / "README.md")
    assert "pretraining" in card.data.tags and card.data.base_model == "google-bert/bert-base-uncased"

    os.rename(tmp_path / "pre", tmp_path / "moved")  # its recorded paths no longer resolve: no base_model claimed
    render.main([str(tmp_path / "moved"), "--kind", "pretraining"])
    assert ModelCard.load(tmp_path / "moved" / "README.md").data.base_model is None
    with pytest.raises(ValueError, match="needs config.json and train_results.json"):
        render.main([str(tmp_path)])


def test_cards_of_real_runs_state_what_their_results_files_say(tmp_path):
    """pretrain.py then finetune.py, a few steps each: every fact a card states equals its folder's JSON files."""
    world = ["--synthetic_images", "60", "--report_to", "none"]
    pretrain.main([*world, "--model_config", "tiny", "--output_dir", str(tmp_path / "pre"), "--max_train_steps", "3",
                   "--per_device_train_batch_size", "8", "--curriculum_epochs", "0", "--logging_steps", "1"])  # fmt: skip
    finetune.main([*world, "--task", "vqa", "--model_name_or_path", str(tmp_path / "pre"), "--output_dir", str(tmp_path / "vqa"),
                   "--max_train_steps", "2", "--per_device_train_batch_size", "4", "--max_eval_samples", "8"])  # fmt: skip
    for name, kind in (("pre", "pretraining"), ("vqa", "vqa")):
        results = json.loads((tmp_path / name / "train_results.json").read_text())
        evaluation = json.loads((tmp_path / name / "eval_results.json").read_text()) if kind == "vqa" else None
        card = ModelCard.load(tmp_path / name / "README.md")
        assert stated_facts(card.text) == expected_facts(results, evaluation, kind)
        assert results["steps_per_epoch"] > results["steps"] and stated_facts(card.text)["epochs"] != "0.00"
        assert str(tmp_path) not in card.content and "widget" not in card.data.to_dict()
    assert "| initialised from | the local folder `pre` (not on the Hub) |" in card.text
