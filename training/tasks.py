"""The downstream tasks, one record each: `TASKS[name]`.

A record holds everything `finetune.py`, the data pipeline and the benchmarks know of a task: its head,
the reader of its real format, the columns of its canonical table (`training/data/downstream.py`), how a
batch's labels and the head's classes are made, how a prediction is read from the model's outputs and
scored. Code outside this module asks the record, never the task's name, so adding a task is one entry here.

`Task` itself is a classification over fixed classes (VE, NLVR2); VQA, REC and retrieval override what
they do differently.
"""

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import datasets
import numpy as np
import torch

from cmal.modeling_cmal import (
    CMALForImageTextClassification,
    CMALForImageTextRetrieval,
    CMALForQuestionAnswering,
    CMALForReferringExpression,
    CMALForVisualReasoning,
)
from cmal.training.data import downstream
from cmal.training.metrics import import_metric_module, load_metric


@dataclass(frozen=True)
class Task:
    """A downstream task whose examples are labelled with one of `class_names`, predicted by argmax."""

    name: str
    head: type
    # Reads the real format into the canonical table; after the path it takes `reader_args` ("annotations":
    # VQA's answers or RefCOCO's instances.json; "split": the split's name in a file that holds them all).
    reader: Callable[..., datasets.Dataset]
    reader_args: tuple[str, ...]
    text_column: str
    target_column: str | None  # None: every text belongs to its image (retrieval)
    metric: str  # an evaluate module of training/metrics/
    main_metric: str  # the result that tables and model cards lead with
    pipeline_task: str  # the task of the fine-tuned checkpoint's pipeline (`config.custom_pipelines`)
    synthetic_table: str  # the synthetic world's table of this task
    image_columns: tuple[str, ...] = ("image_id",)
    class_names: tuple[str, ...] = ()
    negatives: bool = False  # training also pairs a text with another image (a matching head)
    endpoint_handler: bool = False  # a checkpoint with a detector ships the Inference Endpoint handler

    @property
    def split_by_name(self) -> bool:
        """One file holds every split, picked by name; its annotations serve every split too."""
        return "split" in self.reader_args

    def read(self, path: str, annotations: str | None = None, split: str | None = None,
             image_id_template: str = "{}") -> datasets.Dataset:  # fmt: skip
        given = {"annotations": annotations, "split": split}
        return self.reader(path, *(given[name] for name in self.reader_args), image_id_template=image_id_template)

    def label_names(self, train: datasets.Dataset, min_answer_count: int) -> list[str]:
        """The head's classes in id order; none for a head that points at a region."""
        return list(self.class_names)

    def make_labels(self, batch: dict, targets: list, label2id: dict | None) -> torch.Tensor:
        """The `labels` of a collated batch from its examples' targets."""
        return torch.tensor(targets)

    def predict(self, outputs) -> torch.Tensor:
        return outputs.logits.argmax(-1)

    def evaluation_set(self, examples: downstream.TaskExamples, num_images: int) -> tuple:
        """(what the model is run over, the metric's references)."""
        return examples, examples.targets

    def score(self, predictions: torch.Tensor, references: list, id2label: dict) -> dict:
        metric = load_metric(self.metric)
        return metric.compute(predictions=predictions.tolist(), references=references, num_classes=len(id2label))

    def item_scores(self, predictions: torch.Tensor, references: list, id2label: dict) -> list[float]:
        """Each item's share of `main_metric` (their mean is it; retrieval: each text's text->image hit at
        rank 1), for intervals by resampling items (`benchmarks/objectives.py`)."""
        return (predictions == torch.as_tensor(references)).float().tolist()

    def text_labels(self, table: datasets.Dataset) -> list | None:
        """Each example's class as one value, for readers of the text alone (`benchmarks/floors.py`); None
        when the target is no class (a box, a match)."""
        return list(table[self.target_column])

    def chance_predictions(self, rng: np.random.Generator, evaluation_set, id2label: dict) -> dict[str, torch.Tensor]:
        """Predictions of the baselines a result is read against: uniformly random classes."""
        return {"random": torch.from_numpy(rng.integers(len(id2label), size=len(evaluation_set)))}


@dataclass(frozen=True)
class VisualQuestionAnswering(Task):
    """Answers are scored by how many annotators gave them; the classes are the training split's answers."""

    def label_names(self, train, min_answer_count):
        names = downstream.vqa_answer_vocabulary(train[self.target_column], min_answer_count)
        if not names:
            raise ValueError(f"no VQA answer is the majority answer of >= {min_answer_count} training questions: "
                             "lower --min_answer_count")  # fmt: skip
        return names

    def make_labels(self, batch, targets, label2id):
        """Soft scores over `label2id`; answers outside the vocabulary score nothing."""
        labels = torch.zeros(len(targets), len(label2id))
        for k, answers in enumerate(targets):
            for answer, score in downstream.vqa_soft_scores(answers).items():
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
        majority = torch.zeros(len(evaluation_set), dtype=torch.long)
        return {**super().chance_predictions(rng, evaluation_set, id2label), "majority": majority}


@dataclass(frozen=True)
class ReferringExpression(Task):
    """The target is a box; the label is the stored region that overlaps it most, so stores of ground-truth
    boxes and of detected boxes are read alike. The prediction is the chosen region's box."""

    def make_labels(self, batch, targets, label2id):
        boxes = torch.tensor(targets, dtype=torch.float32)
        iou = downstream.box_iou(batch["visual_pos"][..., :4], boxes)
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
        grid = downstream.RetrievalGrid(examples, num_images)
        return grid, grid.references

    def score(self, predictions, references, id2label):
        scores = predictions.reshape(len(references), -1).tolist()
        return load_metric(self.metric).compute(predictions=scores, references=references)

    def item_scores(self, predictions, references, id2label):
        scores = predictions.reshape(len(references), -1).double().numpy()
        ranks = import_metric_module(self.metric)._ranks_desc(scores)[np.arange(len(references)), references]
        return (ranks == 0).astype(float).tolist()

    def chance_predictions(self, rng, evaluation_set, id2label):
        return {"random": torch.from_numpy(rng.random(len(evaluation_set)))}


TASKS = {
    task.name: task
    for task in [
        VisualQuestionAnswering(
            name="vqa", head=CMALForQuestionAnswering, reader=downstream.read_vqa_v2, reader_args=("annotations",),
            text_column="question", target_column="answers", metric="vqa_accuracy", main_metric="vqa_accuracy",
            pipeline_task="visual-question-answering", synthetic_table="vqa", endpoint_handler=True,
        ),
        Task(
            name="ve", head=CMALForImageTextClassification, reader=downstream.read_snli_ve, reader_args=(),
            text_column="hypothesis", target_column="label", metric="classification_accuracy", main_metric="accuracy",
            pipeline_task="visual-entailment", synthetic_table="ve", class_names=tuple(downstream.VE_LABELS),
        ),
        Task(
            name="nlvr2", head=CMALForVisualReasoning, reader=downstream.read_nlvr2, reader_args=(),
            text_column="sentence", target_column="label", metric="classification_accuracy", main_metric="accuracy",
            pipeline_task="visual-reasoning", synthetic_table="nlvr2", image_columns=("left_image_id", "right_image_id"),
            class_names=tuple(downstream.NLVR2_LABELS),
        ),
        ReferringExpression(
            name="rec", head=CMALForReferringExpression, reader=downstream.read_refcoco, reader_args=("annotations", "split"),
            text_column="expression", target_column="target_box", metric="rec_accuracy", main_metric="accuracy",
            pipeline_task="referring-expression", synthetic_table="rec",
        ),
        ImageTextRetrieval(
            name="retrieval", head=CMALForImageTextRetrieval, reader=downstream.read_karpathy, reader_args=("split",),
            text_column="text", target_column=None, metric="retrieval_recall", main_metric="rsum",
            pipeline_task="image-text-retrieval", synthetic_table="captions", class_names=("no match", "match"),
            negatives=True,
        ),
    ]
}  # fmt: skip


def synthetic_texts(world: dict, split: str = "train") -> list[str]:
    """Every text of one split of a loaded synthetic world, all tasks: what a word-level vocabulary is built
    from, so that it covers the downstream questions too, as a real vocabulary does."""
    return [text for task in TASKS.values() for text in world[task.synthetic_table][split][task.text_column]]
