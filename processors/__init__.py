"""CMAL processors: the region image processor, the anchor lexicon and the paired `CMALProcessor`.

Importing the package registers them with `AutoImageProcessor`/`AutoProcessor` for
`model_type="cmal"`, so an installed project loads saved processors without `trust_remote_code`.
"""

from transformers import AutoImageProcessor, AutoProcessor

from ..modeling_cmal import CMALConfig

from .anchor_lexicon import AnchorLexicon
from .image_processing_cmal import CMALImageProcessor
from .processing_cmal import CMALProcessor


AutoImageProcessor.register(CMALConfig, slow_image_processor_class=CMALImageProcessor, exist_ok=True)
AutoProcessor.register(CMALConfig, CMALProcessor, exist_ok=True)

__all__ = ["AnchorLexicon", "CMALImageProcessor", "CMALProcessor"]
