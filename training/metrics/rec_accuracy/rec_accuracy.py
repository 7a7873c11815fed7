"""Referring expression comprehension accuracy (IoU >= threshold) as a local `evaluate` metric."""

import datasets
import evaluate

from cmal.training.metrics.local_metric import local_metric

_DESCRIPTION = """\
Referring expression comprehension (RefCOCO/RefCOCO+/RefCOCOg) accuracy: the share of expressions whose
predicted box has IoU >= `iou_threshold` (default 0.5) with the ground-truth box. Boxes are
[x1, y1, x2, y2] in any unit, as long as predictions and references use the same one. Zero-area
(degenerate or inverted) boxes give IoU 0, never NaN. Also returns the mean IoU.
"""

_CITATION = """\
@inproceedings{yu2016modeling,
  title={Modeling Context in Referring Expressions},
  author={Yu, Licheng and Poirson, Patrick and Yang, Shan and Berg, Alexander C. and Berg, Tamara L.},
  booktitle={ECCV},
  year={2016}
}
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list` of `list` of `float`): predicted boxes [x1, y1, x2, y2].
    references (`list` of `list` of `float`): ground-truth boxes [x1, y1, x2, y2].
    iou_threshold (`float`, default 0.5): a prediction is correct when IoU >= iou_threshold.
Returns:
    accuracy (`float`): share of correct predictions, in [0, 1].
    mean_iou (`float`): mean IoU, in [0, 1].
Examples:
    >>> metric = evaluate.load("training/metrics/rec_accuracy")
    >>> metric.compute(predictions=[[0, 0, 10, 10]], references=[[0, 0, 10, 10]])
    {'accuracy': 1.0, 'mean_iou': 1.0}
"""


IOU_THRESHOLD = 0.5  # a prediction is correct at this IoU or more


def box_iou(a, b):
    """IoU of two [x1, y1, x2, y2] boxes; 0.0 when the union is empty."""
    ax1, ay1, ax2, ay2 = (float(v) for v in a)
    bx1, by1, bx2, by2 = (float(v) for v in b)
    area_a = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1)
    area_b = max(0.0, bx2 - bx1) * max(0.0, by2 - by1)
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    if area_a <= 0.0 or area_b <= 0.0:
        return 0.0
    union = area_a + area_b - inter
    return inter / union if union > 0.0 else 0.0


@local_metric(_DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION, predictions=datasets.Sequence(datasets.Value("float64"), length=4),
              references=datasets.Sequence(datasets.Value("float64"), length=4))
class RecAccuracy(evaluate.Metric):
    def _compute(self, predictions, references, iou_threshold=IOU_THRESHOLD):
        ious = [box_iou(p, r) for p, r in zip(predictions, references)]
        n = len(ious)
        if n == 0:
            return {"accuracy": 0.0, "mean_iou": 0.0}
        hits = sum(1 for v in ious if v >= iou_threshold)
        return {"accuracy": float(hits / n), "mean_iou": float(sum(ious) / n)}
