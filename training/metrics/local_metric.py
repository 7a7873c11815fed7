"""What every local metric script shares: the `evaluate` documentation and `_info` of a metric over `predictions`
and `references` (`local_metric`). Imported by the scripts only (it loads evaluate), not by the package."""

import datasets
import evaluate


def local_metric(description: str, citation: str, inputs_description: str, predictions, references, reference_urls=()):
    """Class decorator of an `evaluate.Metric`: its docstring (evaluate's `add_start_docstrings`) and the `_info`
    evaluate asks for, from the module's texts and the two input features."""

    def info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(description=description, citation=citation, inputs_description=inputs_description,
                                   features=datasets.Features({"predictions": predictions, "references": references}),
                                   reference_urls=list(reference_urls))  # fmt: skip

    def decorate(cls):
        cls._info = info
        return evaluate.utils.file_utils.add_start_docstrings(description, inputs_description)(cls)

    return decorate
