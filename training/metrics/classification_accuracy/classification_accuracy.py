"""Classification accuracy (overall and optional per-class) as a local `evaluate` metric."""

import datasets
import evaluate

from cmal.training.metrics.local_metric import local_metric

_DESCRIPTION = """\
Share of examples whose predicted class id equals the reference class id. With `num_classes`, also the
per-class accuracy (recall of each class: correct predictions among the examples whose reference is that
class), None for a class that never occurs in the references.
"""

_CITATION = ""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list` of `int`): predicted class ids.
    references (`list` of `int`): ground-truth class ids.
    num_classes (`int`, optional): if given, also return `per_class_accuracy` (list of length num_classes).
Returns:
    accuracy (`float`): in [0, 1].
    per_class_accuracy (`list` of `float` or None): only when `num_classes` is given.
Examples:
    >>> metric = evaluate.load("training/metrics/classification_accuracy")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0], num_classes=3)
    {'accuracy': 0.6666666666666666, 'per_class_accuracy': [0.5, 1.0, None]}
"""


@local_metric(_DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION, predictions=datasets.Value("int64"), references=datasets.Value("int64"))
class ClassificationAccuracy(evaluate.Metric):
    def _compute(self, predictions, references, num_classes=None):
        n = len(predictions)
        correct = [int(p) == int(r) for p, r in zip(predictions, references)]
        result = {"accuracy": float(sum(correct) / n) if n else 0.0}
        if num_classes is not None:
            hits = [0] * int(num_classes)
            counts = [0] * int(num_classes)
            for ok, r in zip(correct, references):
                r = int(r)
                if not 0 <= r < num_classes:
                    raise ValueError(f"reference class {r} outside [0, {num_classes})")
                counts[r] += 1
                hits[r] += int(ok)
            result["per_class_accuracy"] = [h / c if c else None for h, c in zip(hits, counts)]
        return result
