# Copyright 2026 The CMAL authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Loading the checkpoints of older CMAL releases: their parameter names (`LEGACY_KEY_MAPPING`, passed by
`CMALPreTrainedModel.from_pretrained`) and their 0-d hypersphere radii (`CMALScalarToVector`, registered with
transformers' conversion mapping on import). A sibling of `modeling_cmal.py`, carried by every saved folder."""

import torch
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import ConversionOps, WeightConverter


class CMALScalarToVector(ConversionOps):
    """Loads a hypersphere radius saved as a 0-d tensor (checkpoints older than FSDP2 support) into a 1-element one."""

    @torch.no_grad()
    def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        (tensors,) = input_dict.values()
        tensor = tensors[0] if isinstance(tensors, list) else tensors
        return {target_patterns[0]: tensor.reshape(1)}

    @property
    def reverse_op(self) -> ConversionOps:
        return self


register_checkpoint_conversion_mapping(
    "cmal", [WeightConverter("hypersphere.scale", "hypersphere.scale", operations=[CMALScalarToVector()])], overwrite=True
)

# Checkpoints saved before the named units (CMAL <= 0.1.0.dev0 of 2026-11) keep loading: their parameter
# names -> today's. Passed as `key_mapping` by `from_pretrained`; patterns are regexes on checkpoint keys.
LEGACY_KEY_MAPPING = {
    r"text_embeddings\.": "text_encoder.embeddings.",
    r"text_hypersphere\.": "text_encoder.hypersphere.",
    r"visual_embeddings\.": "visual_encoder.embeddings.",
    r"visual_hypersphere\.": "visual_encoder.hypersphere.",
    r"^encoder\.": "unified_encoder.",
    r"^cmal\.encoder\.": "cmal.unified_encoder.",
    r"^lm_head\.": "mapping_head.token_head.",
    r"^concept_head\.": "mapping_head.region_head.",
    r"^pointer_head\.": "mapping_head.pointer_head.",
}
