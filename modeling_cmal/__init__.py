"""CMAL model package.

Importing it registers CMAL with the transformers auto classes under `model_type="cmal"`, so an
installed project loads CMAL checkpoints without `trust_remote_code`.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForPreTraining,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoModelForVisualQuestionAnswering,
)

from . import modeling_cmal
from .configuration_cmal import CMAL_PRESETS, COCO_CONCEPT_NAMES, CMALConfig
from .modeling_cmal import *  # noqa: F403  (its `__all__`, which this package's extends)
from .modeling_cmal import (
    CMALForImageTextClassification,
    CMALForImageTextRetrieval,
    CMALForPreTraining,
    CMALForQuestionAnswering,
    CMALForReferringExpression,
    CMALForVisualReasoning,
    CMALModel,
)


AutoConfig.register("cmal", CMALConfig, exist_ok=True)
for _auto, _model in (
    (AutoModel, CMALModel),
    (AutoModelForPreTraining, CMALForPreTraining),
    (AutoModelForVisualQuestionAnswering, CMALForQuestionAnswering),
    # Three heads share this auto class: transformers picks the one named in `config.architectures`
    # (the first when none is), as a checkpoint's own `auto_map` does for remote code.
    (AutoModelForSequenceClassification, (CMALForImageTextClassification, CMALForVisualReasoning, CMALForImageTextRetrieval)),
    (AutoModelForTokenClassification, CMALForReferringExpression),
):
    _auto.register(CMALConfig, _model, exist_ok=True)

__all__ = ["CMAL_PRESETS", "COCO_CONCEPT_NAMES", "CMALConfig", *modeling_cmal.__all__]
