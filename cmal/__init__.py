"""CMAL: Cross-Modal Associative Learning for region-based vision-language pre-training.

Everything installs under this one namespace (`pip install cmal`):

    from cmal import CMALConfig, CMALForQuestionAnswering, CMALProcessor

The sub-packages map onto the repository's top-level folders: `cmal.modeling_cmal` (the model, the
files a Hub checkpoint ships), `cmal.processors`, `cmal.training` (scripts, data, metrics, configs),
`cmal.model_cards` and `cmal.endpoint` (the Inference Endpoint handler). Importing `cmal` registers
CMAL with transformers' `Auto*` classes under `model_type="cmal"`.
"""

from .modeling_cmal import *  # noqa: F403
from .modeling_cmal import __all__ as _model_names
from .processors import AnchorLexicon, CMALImageProcessor, CMALProcessor


__version__ = "0.1.0.dev0"
__all__ = [*_model_names, "AnchorLexicon", "CMALImageProcessor", "CMALProcessor"]
