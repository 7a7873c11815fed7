"""CMAL: Cross-Modal Associative Learning for region-based vision-language pre-training.

Everything installs under this one namespace (`pip install cmal`):

    from cmal import CMALConfig, CMALForQuestionAnswering, CMALProcessor

The sub-packages map onto the repository's top-level folders: `cmal.modeling_cmal` (the model, the
files a Hub checkpoint ships), `cmal.processors`, `cmal.training` (scripts, data, metrics, configs),
`cmal.model_cards` and `cmal.endpoint` (the Inference Endpoint handler).

The public names load on first use (as transformers' own do), so `import cmal.training....` costs no torch
and a script's `--help` answers at once. Loading them (`from cmal import CMALConfig`, or importing
`cmal.modeling_cmal`) registers CMAL with transformers' `Auto*` classes under `model_type="cmal"`.
"""

import importlib


__version__ = "0.1.0.dev0"
_SUBMODULE_OF = {
    **dict.fromkeys(
        ["CMAL_PRESETS", "COCO_CONCEPT_NAMES", "CMALConfig", "CMALPreTrainedModel", "CMALModel", "CMALForPreTraining",
         "CMALForQuestionAnswering", "CMALForImageTextClassification", "CMALForVisualReasoning",
         "CMALForReferringExpression", "CMALForImageTextRetrieval", "CMALModelOutput", "CMALForPreTrainingOutput",
         "CMALReferringExpressionOutput", "CMALImageTextRetrievalOutput", "anchor_operator"],
        "modeling_cmal",
    ),
    **dict.fromkeys(["AnchorLexicon", "CMALImageProcessor", "CMALProcessor"], "processors"),
}  # fmt: skip
__all__ = list(_SUBMODULE_OF)


def __getattr__(name: str):
    if name not in _SUBMODULE_OF:
        raise AttributeError(f"module 'cmal' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_SUBMODULE_OF[name]}", __name__), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__():
    return sorted([*globals(), *__all__])
