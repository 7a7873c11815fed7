"""A sixth task from outside the package (examples/custom_task: one file and its card template) is fine-tuned,
scored and carded like the built-in five: every list of tasks is read from the registry."""

import json
import sys

import numpy as np
import pytest
from huggingface_hub import ModelCard
from conftest import REPO, run_card_snippet
from test_finetune import common

from cmal.model_cards import render
from cmal.training import finetune
from cmal.training.data import synthetic
from cmal.training.tasks import TASKS, Metric, Task, register_task, synthetic_texts


@pytest.fixture(scope="module")
def object_count():
    """The example's task, registered for this module's tests and removed after (other tests list the five)."""
    sys.path.insert(0, str(REPO / "examples" / "custom_task"))
    try:
        import object_count

        yield object_count.TASK
    finally:
        TASKS.pop("object_count", None)
        sys.modules.pop("object_count", None)
        sys.path.remove(str(REPO / "examples" / "custom_task"))


def test_every_task_list_reads_the_registry(object_count):
    assert "object_count" in render.card_kinds() and render.card_kinds()["object_count"].task_name == "Object Counting"
    assert finetune.parse_args(["--task", "object_count", "--output_dir", "unused"]).task == "object_count"
    world = synthetic.load_world(synthetic.default_world(num_images=70))
    assert set(object_count.synthetic_data(world)["train"]["question"]) <= set(synthetic_texts(world))  # in the vocabulary


def test_the_sixth_task_fine_tunes_and_cards_end_to_end(object_count, tmp_path):
    folder = tmp_path / "count"
    results = finetune.main(common(folder, 6) + ["--task", "object_count", "--synthetic_images", "70", "--synthetic_test"])
    world = synthetic.load_world(synthetic.default_world(num_images=70))
    table = object_count.synthetic_data(world)
    saved = json.loads((folder / "eval_results.json").read_text())
    assert saved["task"] == "object_count" and saved["eval_samples"] == len(table["validation"]) > 0
    assert 0 <= saved["vqa_accuracy"] <= 1 and len(results["test"]["item_scores"]) == len(table["test"])
    assert np.mean(results["test"]["item_scores"]) == pytest.approx(results["test"]["vqa_accuracy"])
    config = json.loads((folder / "config.json").read_text())
    counts = {answers[0] for answers in table["train"]["answers"]}
    assert config["architectures"] == ["CMALForQuestionAnswering"] and set(config["label2id"]) == counts
    card = ModelCard.load(folder / "README.md")
    assert "object_count" in card.data.tags and "counts" in card.text  # its own template
    assert card.data.eval_results[0].metric_name == "Counting accuracy"
    assert card.data.eval_results[0].metric_value == pytest.approx(saved["vqa_accuracy"], abs=1e-4)
    render.render_folder(str(folder))  # the CLI's re-render tells the kind from eval_results.json
    row = world["regions"].with_format("numpy")[0]
    width, height = int(row["image_width"]), int(row["image_height"])
    made = run_card_snippet(folder, tmp_path / "snippet", features=row["features"], width=width, height=height,
                            boxes=row["boxes"] * [width, height, width, height], scores=row["scores"],
                            tags=[synthetic.CONCEPT_NAMES[i] for i in row["concept_ids"]])  # fmt: skip
    assert made["answer"] in counts


def card_facts(**changes):
    facts = dict(name="toy", head_name="CMALForQuestionAnswering", reader_name="read_vqa_v2", reader_args=("annotations",),
                 text_column="question", target_column="answers", metric="vqa_accuracy", main_metric="vqa_accuracy",
                 pipeline_task="visual-question-answering", synthetic_table="vqa", card_title="Toy",
                 card_metrics=(Metric("vqa_accuracy", "accuracy", "VQA accuracy"),),
                 card_template=str(REPO / "model_cards" / "templates" / "vqa.md"))  # fmt: skip
    return Task(**{**facts, **changes})


@pytest.mark.parametrize("task, error, message", [
    (card_facts(name="vqa"), ValueError, "a task named 'vqa' is already registered"),
    (card_facts(name="pretraining"), ValueError, "a task named 'pretraining' is already registered"),
    (card_facts(card_metrics=(Metric("mean_iou", "mean_iou", "IoU"),)), ValueError, "must start with its main_metric 'vqa_accuracy'"),
    (card_facts(card_template="/nowhere/toy.md"), FileNotFoundError, "no model card template at '/nowhere/toy.md'"),
    ("vqa", TypeError, "register_task takes a Task record, got str"),
])  # fmt: skip
def test_register_task_refuses_what_would_fail_mid_run(task, error, message):
    with pytest.raises(error, match=message):
        register_task(task)
    assert "toy" not in TASKS
