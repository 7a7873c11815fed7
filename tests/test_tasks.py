"""training/tasks.py: one record per downstream task, agreeing with the model, the metrics, the model cards
and the synthetic world, and the only place that tells tasks apart."""

import os
import re
import sys
from pathlib import Path

import pytest
from conftest import REPO

from cmal.model_cards.render import card_kinds
from cmal.modeling_cmal.modeling_cmal import CMAL_PIPELINE_TASKS
from cmal.training.data import synthetic
from cmal.training.data.downstream import TaskExamples
from cmal.training.metrics import METRIC_NAMES
from cmal.training.tasks import TASKS, synthetic_texts


NAMES = "|".join(TASKS)
# A comparison with a task's name, a membership test in a literal list of names, a comparison of a
# variable named *task*, or a type test of a task record: each asks "which task is this?".
BRANCH = re.compile(
    rf"""(==|!=)\s*["']({NAMES})["']|["']({NAMES})["']\s*(==|!=)|\bin\s*[(\[{{]\s*["']({NAMES})["']"""
    r"""|\w*task\w*(\.name)?\s*(==|!=)|isinstance\(\s*\w*task"""
)


def test_no_task_branches_outside_the_registry():
    files = [path for folder in ("training", "benchmarks") for path in sorted((REPO / folder).rglob("*.py"))]
    assert REPO / "training" / "finetune.py" in files and REPO / "benchmarks" / "finetune_table.py" in files
    found = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
             for path in files if path != REPO / "training" / "tasks.py"
             for number, line in enumerate(path.read_text().splitlines(), 1) if BRANCH.search(line)]  # fmt: skip
    assert not found, "dispatch through the task's record (training/tasks.py) instead:\n" + "\n".join(found)


def test_the_branch_pattern_finds_branches():
    for line in ['if args.task == "vqa":', 'elif task in ("ve", "nlvr2"):', "if self.task != task_name:",
                 "'rec' == kind", "isinstance(task, ReferringExpression)", 'if task.name == "retrieval":']:  # fmt: skip
        assert BRANCH.search(line), line
    for line in ["for task in TASKS.values():", 'TASKS["rec"].read(path)', 'if word in ("small", "large"):']:
        assert not BRANCH.search(line), line


@pytest.mark.parametrize("name", TASKS)
def test_records_agree_with_the_model_metrics_and_cards(name):
    task = TASKS[name]
    assert task.name == name
    assert CMAL_PIPELINE_TASKS[task.head][0] == task.pipeline_task
    assert task.metric in METRIC_NAMES
    kind = card_kinds()[name]
    assert kind.head is task.head and kind.metrics[0].key == task.main_metric  # the card leads with it


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthetic.load_world(synthetic.build_world(tmp_path_factory.mktemp("synthetic") / "world", num_images=80))  # 80: REC has validation items (60 leave none)


@pytest.mark.parametrize("name", TASKS)
def test_the_synthetic_world_writes_the_canonical_tables(name, world):
    """The world's tables have the columns the readers of the real formats give, so they are read alike."""
    task = TASKS[name]
    for split in ("train", "validation"):
        table = task.synthetic_data(world)[split]
        assert {*task.image_columns, task.text_column} | ({task.target_column} - {None}) <= set(table.column_names)
        examples = TaskExamples(task, table, world["regions"])
        assert len(examples) == len(table) > 0
    if task.target_column == "answers":  # VQA: a list of the annotators' answers, as read_vqa_v2 gives
        assert all(isinstance(a, list) and all(isinstance(x, str) for x in a) for a in table["answers"])
    if task.target_column == "target_box":
        assert all(len(box) == 4 for box in table["target_box"])


def test_synthetic_texts_cover_every_task(world):
    texts = set(synthetic_texts(world))
    for task in TASKS.values():
        assert set(task.synthetic_data(world)["train"][task.text_column]) <= texts


@pytest.mark.parametrize("name", TASKS)
def test_chance_baselines(name, world):
    sys.path.insert(0, os.fspath(Path(REPO) / "benchmarks"))
    from finetune_table import chance

    task = TASKS[name]
    result = chance(task, world, draws=3, retrieval_images=4)
    assert set(result) == ({"random", "majority"} if name == "vqa" else {"random"})
    assert all(0 <= value <= (600 if task.main_metric == "rsum" else 1) for value in result.values())


@pytest.mark.parametrize("name", TASKS)
def test_item_scores_average_to_the_main_metric(name, world):
    """Intervals resample items (benchmarks/objectives.py): each item's score must be its share of the metric."""
    import numpy as np

    task = TASKS[name]
    table = task.synthetic_data(world)
    id2label = dict(enumerate(task.label_names(table["train"], 1)))
    evaluation_set, references = task.evaluation_set(TaskExamples(task, table["validation"], world["regions"]), 4)
    main, scale = task.item_main_metric
    for seed in range(3):
        for predictions in task.chance_predictions(np.random.default_rng(seed), evaluation_set, id2label).values():
            items = task.item_scores(predictions, references, id2label)
            assert len(items) == len(references) and all(0 <= item <= 1 for item in items)
            assert np.mean(items) * scale == pytest.approx(task.score(predictions, references, id2label)[main])
