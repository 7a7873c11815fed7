"""The downstream tasks, one record each: `TASKS[name]`.

A record holds everything `finetune.py`, the data pipeline and the benchmarks know of a task: its head,
the reader of its real format, the columns of its canonical table (`training/data/downstream.py`), how a
batch's labels and the head's classes are made, how a prediction is read from the model's outputs and
scored, its table in the synthetic world, and what its model card states. Code outside this module asks the
record, never the task's name, and every list of tasks (`finetune.py --task`, the card kinds, the benchmarks')
is read from `TASKS`, so adding a task is one record: `register_task(...)` from a file of your own, with its
card template beside it (`tests/toy_task.py` is one).

The registry is light to import (a script's `--help` reads it): heads and readers are named, as
"module:attribute" (a bare name is a head of `cmal.modeling_cmal` or a reader of `training/data/downstream.py`),
and loaded on first use; torch and datasets load with them.

`Task` itself is a classification over fixed classes (VE, NLVR2); VQA, REC and retrieval override what
they do differently.
"""

import importlib
import os
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from cmal.training.data.labels import NLVR2_LABELS, VE_LABELS
from cmal.training.metrics import import_metric_module, load_metric


class Metric(NamedTuple):
    """A metric a model card reports: its key in `eval_results.json`, its Hub metric id, the name the card shows."""

    key: str
    type: str
    name: str


CARD_TEMPLATES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model_cards", "templates")


def _load(reference: str, default_module: str):
    """The attribute a "module:attribute" reference (or a bare attribute of `default_module`) names."""
    module, _, attribute = reference.rpartition(":")
    return getattr(importlib.import_module(module or default_module), attribute)


@dataclass(frozen=True)
class Task:
    """A downstream task whose examples are labelled with one of `class_names`, predicted by argmax."""

    name: str
    head_name: str  # its CMAL head class, loaded on use (`head`)
    # Reads the real format into the canonical table; after the path it takes `reader_args` ("annotations":
    # VQA's answers or RefCOCO's instances.json; "split": the split's name in a file that holds them all).
    reader_name: str
    reader_args: tuple[str, ...]
    text_column: str
    target_column: str | None  # None: every text belongs to its image (retrieval)
    metric: str  # an evaluate module of training/metrics/
    main_metric: str  # the result that tables and model cards lead with
    pipeline_task: str  # the task of the fine-tuned checkpoint's pipeline (`config.custom_pipelines`)
    synthetic_table: str  # the synthetic world's table of this task (`synthetic_data`)
    card_title: str  # the task as its model card and `model-index` name it
    card_metrics: tuple[Metric, ...]  # what the card reports, `main_metric` first (the one a leaderboard shows)
    hub_pipeline_tag: str | None = None  # the card's `pipeline_tag`: a Hub task where one fits
    card_template: str | None = None  # a Jinja template extending the shared base; default templates/<name>.md
    image_columns: tuple[str, ...] = ("image_id",)
    class_names: tuple[str, ...] = ()
    negatives: bool = False  # training also pairs a text with another image (a matching head)
    endpoint_handler: bool = False  # a checkpoint with a detector ships the Inference Endpoint handler
    # (eval key, scale) that the mean of `item_scores` equals (times scale); default (main_metric, 1)
    item_metric: tuple[str, int] | None = None
    group_column: str | None = None  # a column grouping held-out items: the main metric is also given per group

    @property
    def head(self) -> type:
        return _load(self.head_name, "cmal.modeling_cmal")

    @property
    def template_path(self) -> str:
        return self.card_template or os.path.join(CARD_TEMPLATES, f"{self.name}.md")

    @property
    def item_main_metric(self) -> tuple[str, int]:
        return self.item_metric or (self.main_metric, 1)

    @property
    def split_by_name(self) -> bool:
        """One file holds every split, picked by name; its annotations serve every split too."""
        return "split" in self.reader_args

    def read(self, path: str, annotations: str | None = None, split: str | None = None, image_id_template: str = "{}"):
        """The canonical table (a `datasets.Dataset`) of a file in the task's real format."""
        given = {"annotations": annotations, "split": split}
        reader = _load(self.reader_name, "cmal.training.data.downstream")
        return reader(path, *(given[name] for name in self.reader_args), image_id_template=image_id_template)

    def synthetic_data(self, world: dict):
        """The task's train/validation/test tables (a `DatasetDict`) in a loaded synthetic world; a task the
        world does not write derives its table from the world's scenes here."""
        return world[self.synthetic_table]

    def label_names(self, train, min_answer_count: int) -> list[str]:
        """The head's classes in id order; none for a head that points at a region."""
        return list(self.class_names)

    def make_labels(self, batch: dict, targets: list, label2id: dict | None):
        """The `labels` tensor of a collated batch from its examples' targets."""
        import torch

        return torch.tensor(targets)

    def predict(self, outputs):
        return outputs.logits.argmax(-1)

    def evaluation_set(self, examples, num_images: int) -> tuple:
        """(what the model is run over, the metric's references)."""
        return examples, examples.targets

    def score(self, predictions, references: list, id2label: dict) -> dict:
        metric = load_metric(self.metric)
        return metric.compute(predictions=predictions.tolist(), references=references, num_classes=len(id2label))

    def item_scores(self, predictions, references: list, id2label: dict) -> list[float]:
        """Each item's share of `item_main_metric` (their mean is it), for intervals by resampling items
        (`benchmarks/objectives.py`)."""
        return (np.asarray(predictions) == np.asarray(references)).astype(float).tolist()

    def text_labels(self, table) -> list | None:
        """Each example's class as one value, for readers of the text alone (`benchmarks/floors.py`); None
        when the target is no class (a box, a match)."""
        return list(table[self.target_column])

    def chance_predictions(self, rng: np.random.Generator, evaluation_set, id2label: dict) -> dict:
        """Predictions (tensors) of the baselines a result is read against: uniformly random classes."""
        import torch

        return {"random": torch.from_numpy(rng.integers(len(id2label), size=len(evaluation_set)))}


@dataclass(frozen=True)
class VisualQuestionAnswering(Task):
    """Answers are scored by how many annotators gave them; the classes are the training split's answers."""

    def label_names(self, train, min_answer_count):
        from cmal.training.data.downstream import vqa_answer_vocabulary

        names = vqa_answer_vocabulary(train[self.target_column], min_answer_count)
        if not names:
            raise ValueError(f"no VQA answer is the majority answer of >= {min_answer_count} training questions: "
                             "lower --min_answer_count")  # fmt: skip
        return names

    def make_labels(self, batch, targets, label2id):
        """Soft scores over `label2id`; answers outside the vocabulary score nothing."""
        import torch

        from cmal.training.data.downstream import vqa_soft_scores

        labels = torch.zeros(len(targets), len(label2id))
        for k, answers in enumerate(targets):
            for answer, score in vqa_soft_scores(answers).items():
                if answer in label2id:
                    labels[k, label2id[answer]] = score
        return labels

    def score(self, predictions, references, id2label):
        return load_metric(self.metric).compute(predictions=[id2label[int(i)] for i in predictions], references=references)

    def item_scores(self, predictions, references, id2label):
        metric = import_metric_module(self.metric)
        return [metric.vqa_soft_score(metric.normalize_answer(id2label[int(i)]), [metric.normalize_answer(a) for a in answers])
                for i, answers in zip(predictions, references)]  # fmt: skip

    def text_labels(self, table):
        """The answer most annotators gave."""
        return [Counter(answers).most_common(1)[0][0] for answers in table[self.target_column]]

    def chance_predictions(self, rng, evaluation_set, id2label):
        """Random answers, and always the most frequent training answer (the vocabulary's first)."""
        import torch

        majority = torch.zeros(len(evaluation_set), dtype=torch.long)
        return {**super().chance_predictions(rng, evaluation_set, id2label), "majority": majority}


@dataclass(frozen=True)
class ReferringExpression(Task):
    """The target is a box; the label is the stored region that overlaps it most, so stores of ground-truth
    boxes and of detected boxes are read alike. The prediction is the chosen region's box."""

    def make_labels(self, batch, targets, label2id):
        import torch

        from cmal.training.data.downstream import box_iou

        iou = box_iou(batch["visual_pos"][..., :4], torch.tensor(targets, dtype=torch.float32))
        return iou.masked_fill(batch["visual_attention_mask"] == 0, -1).argmax(-1)

    def predict(self, outputs):
        return outputs.predicted_boxes

    def text_labels(self, table):
        return None

    def score(self, predictions, references, id2label):
        return load_metric(self.metric).compute(predictions=predictions.tolist(), references=references)

    def item_scores(self, predictions, references, id2label):
        metric = import_metric_module(self.metric)
        return [float(metric.box_iou(box, target) >= metric.IOU_THRESHOLD) for box, target in zip(predictions.tolist(), references)]

    def chance_predictions(self, rng, evaluation_set, id2label):
        """The box of a random region of each image."""
        import torch

        images = evaluation_set.regions_of_images([rows[0] for rows in evaluation_set.image_rows])
        return {"random": torch.tensor(np.stack([image["boxes"][rng.integers(len(image["boxes"]))] for image in images]))}


@dataclass(frozen=True)
class ImageTextRetrieval(Task):
    """Trained as matching (with negatives); evaluated by scoring every text of the first `num_images`
    validation images against each of them, recall@K over that score matrix."""

    def predict(self, outputs):
        return outputs.scores

    def text_labels(self, table):
        return None

    def evaluation_set(self, examples, num_images):
        from cmal.training.data.downstream import RetrievalGrid

        grid = RetrievalGrid(examples, num_images)
        return grid, grid.references

    def score(self, predictions, references, id2label):
        scores = predictions.reshape(len(references), -1).tolist()
        return load_metric(self.metric).compute(predictions=scores, references=references)

    def item_scores(self, predictions, references, id2label):
        scores = predictions.reshape(len(references), -1).double().numpy()
        ranks = import_metric_module(self.metric)._ranks_desc(scores)[np.arange(len(references)), references]
        return (ranks == 0).astype(float).tolist()

    def chance_predictions(self, rng, evaluation_set, id2label):
        import torch

        return {"random": torch.from_numpy(rng.random(len(evaluation_set)))}


ACCURACY = Metric("accuracy", "accuracy", "Accuracy")
RECALLS = tuple(Metric(f"{direction}_r{k}", "recall", f"{label} R@{k} (%)")
                for direction, label in (("text_to_image", "Text-to-image"), ("image_to_text", "Image-to-text"))
                for k in (1, 5, 10))  # fmt: skip
TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add a task to `TASKS` (fine-tuning's `--task`, the card kinds and the benchmarks read it); returns it.

    A file of your own can define and register one before calling `finetune.main`; a name that is taken, a
    card that would not lead with the main metric, or a missing card template is refused here, not mid-run.
    """
    if not isinstance(task, Task):
        raise TypeError(f"register_task takes a Task record, got {type(task).__name__}")
    if task.name in TASKS or task.name == "pretraining":
        raise ValueError(f"a task named {task.name!r} is already registered ({', '.join(TASKS)}, and pretraining's card)")
    if not task.card_metrics or task.card_metrics[0].key != task.main_metric:
        raise ValueError(f"task {task.name!r}: card_metrics must start with its main_metric {task.main_metric!r}")
    if not os.path.isfile(task.template_path):
        raise FileNotFoundError(f"task {task.name!r}: no model card template at {task.template_path!r}")
    TASKS[task.name] = task
    return task


for _task in [
    VisualQuestionAnswering(
        name="vqa", head_name="CMALForQuestionAnswering", reader_name="read_vqa_v2", reader_args=("annotations",),
        text_column="question", target_column="answers", metric="vqa_accuracy", main_metric="vqa_accuracy",
        pipeline_task="visual-question-answering", synthetic_table="vqa", endpoint_handler=True, group_column="question_type",
        card_title="Visual Question Answering", card_metrics=(Metric("vqa_accuracy", "accuracy", "VQA accuracy"),),
        hub_pipeline_tag="visual-question-answering",
    ),
    Task(
        name="ve", head_name="CMALForImageTextClassification", reader_name="read_snli_ve", reader_args=(),
        text_column="hypothesis", target_column="label", metric="classification_accuracy", main_metric="accuracy",
        pipeline_task="visual-entailment", synthetic_table="ve", class_names=tuple(VE_LABELS),
        card_title="Visual Entailment", card_metrics=(ACCURACY,),
    ),
    Task(
        name="nlvr2", head_name="CMALForVisualReasoning", reader_name="read_nlvr2", reader_args=(),
        text_column="sentence", target_column="label", metric="classification_accuracy", main_metric="accuracy",
        pipeline_task="visual-reasoning", synthetic_table="nlvr2", image_columns=("left_image_id", "right_image_id"),
        class_names=tuple(NLVR2_LABELS), card_title="Visual Reasoning (NLVR2)", card_metrics=(ACCURACY,),
    ),
    ReferringExpression(
        name="rec", head_name="CMALForReferringExpression", reader_name="read_refcoco", reader_args=("annotations", "split"),
        text_column="expression", target_column="target_box", metric="rec_accuracy", main_metric="accuracy",
        pipeline_task="referring-expression", synthetic_table="rec", card_title="Referring Expression Comprehension",
        card_metrics=(Metric("accuracy", "accuracy", "Accuracy (IoU >= 0.5)"), Metric("mean_iou", "mean_iou", "Mean IoU")),
    ),
    ImageTextRetrieval(
        name="retrieval", head_name="CMALForImageTextRetrieval", reader_name="read_karpathy", reader_args=("split",),
        text_column="text", target_column=None, metric="retrieval_recall", main_metric="rsum",
        pipeline_task="image-text-retrieval", synthetic_table="captions", class_names=("no match", "match"),
        negatives=True, card_title="Image-Text Retrieval", card_metrics=(Metric("rsum", "recall", "R-sum (%)"), *RECALLS),
        item_metric=("text_to_image_r1", 100),  # rsum sums six recalls; an item's hit is text->image R@1
    ),
]:
    register_task(_task)


def synthetic_texts(world: dict, split: str = "train") -> list[str]:
    """Every text of one split of a loaded synthetic world, all tasks: what a word-level vocabulary is built
    from, so that it covers the downstream questions too, as a real vocabulary does."""
    return [text for task in TASKS.values() for text in task.synthetic_data(world)[split][task.text_column]]
