"""Local `evaluate` metrics for CMAL downstream tasks, loadable offline by path.

Each metric is a folder holding one script of the same name, as `evaluate.load(<folder>)` expects.
"""

import importlib.util
from pathlib import Path

import numpy as np

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = ("vqa_accuracy", "classification_accuracy", "rec_accuracy", "retrieval_recall")


def metric_path(name):
    """Absolute path of the folder of metric `name`."""
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; choose from {METRIC_NAMES}")
    return str(METRICS_DIR / name)


def load_metric(name, **kwargs):
    """`evaluate.load` the local metric `name` by its absolute folder path (works offline)."""
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)


def import_metric_module(name):
    """Import a metric script as a plain module (e.g. for `vqa_accuracy.normalize_answer`)."""
    path = Path(metric_path(name)) / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"cmal_metric_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def binary_auc(scores, labels) -> float:
    """Area under the ROC curve of `scores` for the binary `labels` (Mann-Whitney U: the probability that a
    positive outscores a negative, ties counting half); NaN when one class is absent."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if not positives or not negatives:
        return float("nan")
    _, tie_group, tie_counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = np.empty(len(scores))
    ranks[scores.argsort(kind="stable")] = np.arange(1, len(scores) + 1)
    ranks = (np.bincount(tie_group, weights=ranks) / tie_counts)[tie_group]  # ties share their mean rank
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


__all__ = ["METRIC_NAMES", "METRICS_DIR", "binary_auc", "import_metric_module", "load_metric", "metric_path"]
