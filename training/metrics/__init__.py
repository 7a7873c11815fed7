"""Local `evaluate` metrics for CMAL downstream tasks, loadable offline by path.

Each metric is a folder holding one script of the same name, as `evaluate.load(<folder>)` expects.
"""

import importlib.util
from pathlib import Path

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


__all__ = ["METRIC_NAMES", "METRICS_DIR", "import_metric_module", "load_metric", "metric_path"]
