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
"""PyTorch CMAL model: Cross-Modal Associative Learning over image regions and text.

One flat file in the transformers style, its units in data-flow order (DESIGN §1):

    0. raw images -> regions           `CMALRegionDetector` (optional)
    1. anchor detection ⊕              `anchor_operator`
    2. uni-modal encoders + sphere     `CMALUnimodalEncoder` (text: `CMALTextEmbeddings`, regions:
                                       `CMALVisualEmbeddings`; `CMALHypersphere`)
    3. associative prompt layer        `CMALAssociativePromptLayer` -> `CMALAssociativePromptOutput`
    4. unified encoder + pooler        `CMALUnifiedEncoder`, `CMALPooler`
    5. associative mapping (AMC)       `CMALAssociativeMappingHead` -> `CMALAssociativeMappingOutput`

It ships as Hub remote code, so it imports only torch, transformers and its siblings (relatively, so every
saved folder carries them): `configuration_cmal.py`, `validation_cmal.py` (the checks at its boundaries: inputs,
labels, what `from_pretrained` reads) and `legacy_cmal.py` (loading older CMAL checkpoints).
"""

import copy
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Unpack

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import ModelOutput, TransformersKwargs, auto_docstring, can_return_tuple, logging

from .configuration_cmal import CMALConfig
from .legacy_cmal import LEGACY_KEY_MAPPING
from .validation_cmal import check_labels, check_loaded_weights, check_model_folder, validate_model_inputs


try:  # transformers >= 5.2: output capturing has its own decorator
    from transformers.utils.output_capturing import OutputRecorder, capture_outputs
except ImportError:  # transformers 5.0/5.1: `check_model_inputs` captures outputs
    from transformers.utils.generic import OutputRecorder
    from transformers.utils.generic import check_model_inputs as capture_outputs


logger = logging.get_logger(__name__)


# Modality types of the unified encoder's input slots.
TEXT_TYPE, REGION_TYPE, PROMPT_TYPE = 0, 1, 2


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------


@dataclass
class CMALModelOutput(ModelOutput):
    r"""
    Output of [`CMALModel`]: the unified encoder's states, the uni-modal features, and what the anchor operator
    and the associative prompt layer did.

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, text_len + num_regions, hidden_size)`):
            Unified-encoder output over `[CLS] text [SEP] regions`; the first `text_len` slots are text.
        pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            tanh pooler over the unified `[CLS]` slot.
        text_features (`torch.FloatTensor` of shape `(batch_size, text_len, hidden_size)`):
            Uni-modal text encoder output (on the hypersphere when `config.hypersphere`).
        region_features (`torch.FloatTensor` of shape `(batch_size, num_regions, hidden_size)`):
            Uni-modal region encoder output (on the hypersphere when `config.hypersphere`).
        text_embeds, image_embeds (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            Unit vectors of the text `[CLS]` feature and the mean region feature, used by the ITC loss.
        anchor_map (`torch.LongTensor` of shape `(batch_size, text_len, num_regions)`):
            The anchor operator ⊕: `anchor_map[b, t, r]` is 1 when token `t` and region `r` denote the same
            concept. This and the other masks of the output are 0/1 integers, not booleans, so that every
            output tensor supports the arithmetic and comparisons transformers applies to outputs.
        token_swapped, region_swapped (`torch.LongTensor` of shape `(batch_size, text_len)` / `(batch_size, num_regions)`):
            1 at slots whose own feature was masked and replaced by their partner's feature.
        token_partner, region_partner (`torch.LongTensor`, same shapes):
            For each swapped slot, the index of the partner whose feature filled it; -1 elsewhere.
        region_boxes (`torch.FloatTensor` of shape `(batch_size, num_regions, 4)`):
            The regions' normalised `(x1, y1, x2, y2)`, detected from `pixel_values` or given in `visual_pos`.
        region_concept_ids, region_scores, region_mask (`(batch_size, num_regions)`):
            The regions' concept ids, detector scores and validity mask (1 for a real region; detected or as given).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            Unified-encoder input and the output of each of its layers.
        attentions (`tuple(torch.FloatTensor)`, *optional*):
            Attention weights of each unified-encoder layer, `(batch_size, num_heads, seq_len, seq_len)`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    text_features: torch.FloatTensor | None = None
    region_features: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    anchor_map: torch.LongTensor | None = None
    token_swapped: torch.LongTensor | None = None
    region_swapped: torch.LongTensor | None = None
    token_partner: torch.LongTensor | None = None
    region_partner: torch.LongTensor | None = None
    region_boxes: torch.FloatTensor | None = None
    region_concept_ids: torch.LongTensor | None = None
    region_scores: torch.FloatTensor | None = None
    region_mask: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class CMALForPreTrainingOutput(ModelOutput):
    r"""
    Output of [`CMALForPreTraining`]: the weighted total loss, each objective's loss and the heads' scores.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Sum of the losses below, each times its weight in the config; `None` when none was computed.
        mlm_loss, mrm_feature_loss, mrm_concept_loss, itm_loss, amc_token_loss, amc_region_loss, amc_pointer_loss, itc_loss (`torch.FloatTensor`, *optional*):
            Each objective on its own, unweighted; `None` when switched off or without targets.
        prediction_logits (`torch.FloatTensor` of shape `(batch_size, text_len, vocab_size)`):
            Vocabulary scores at every text slot (MLM and AMC-token).
        region_feature_predictions (`torch.FloatTensor` of shape `(batch_size, num_regions, visual_feat_dim)`):
            Regressed region features (MRM).
        region_concept_logits (`torch.FloatTensor` of shape `(batch_size, num_regions, num_concepts)`):
            Concept scores at every region slot (MRM and AMC-region).
        pointer_logits (`torch.FloatTensor` of shape `(batch_size, text_len, num_regions)`):
            Score of every region as the partner of every token (AMC-pointer); padded regions get the
            dtype's minimum.
        itm_logits (`torch.FloatTensor` of shape `(batch_size, 2)`, *optional*):
            Image-text matching scores of the clean pass; index 1 means "the pair matches". `None` when neither
            ITM nor ITC is on.
        itc_logits (`torch.FloatTensor` of shape `(batch_size, batch_size)`, *optional*):
            Text-to-image cosine similarity of the projected uni-modal vectors (clean pass) divided by the
            learnt ITC temperature.
        text_embeds, image_embeds (`torch.FloatTensor` of shape `(batch_size, itc_projection_dim)`, *optional*):
            Those projected unit vectors of the text `[CLS]` and the mean region feature (with ITC on): what
            retrieval by ITC ranks with.
    """

    loss: torch.FloatTensor | None = None
    mlm_loss: torch.FloatTensor | None = None
    mrm_feature_loss: torch.FloatTensor | None = None
    mrm_concept_loss: torch.FloatTensor | None = None
    itm_loss: torch.FloatTensor | None = None
    amc_token_loss: torch.FloatTensor | None = None
    amc_region_loss: torch.FloatTensor | None = None
    amc_pointer_loss: torch.FloatTensor | None = None
    itc_loss: torch.FloatTensor | None = None
    prediction_logits: torch.FloatTensor | None = None
    region_feature_predictions: torch.FloatTensor | None = None
    region_concept_logits: torch.FloatTensor | None = None
    pointer_logits: torch.FloatTensor | None = None
    itm_logits: torch.FloatTensor | None = None
    itc_logits: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    anchor_map: torch.LongTensor | None = None
    token_swapped: torch.LongTensor | None = None
    region_swapped: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class CMALReferringExpressionOutput(ModelOutput):
    r"""
    Output of [`CMALForReferringExpression`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Cross-entropy over the regions of each example, returned when `labels` is given.
        logits (`torch.FloatTensor` of shape `(batch_size, num_regions)`):
            One score per region; padded regions get the dtype's minimum.
        predicted_boxes (`torch.FloatTensor` of shape `(batch_size, 4)`):
            Normalised `(x1, y1, x2, y2)` of the best-scoring region of each example.
        region_boxes (`torch.FloatTensor` of shape `(batch_size, num_regions, 4)`):
            Normalised boxes of all regions (detected from `pixel_values` or given in `visual_pos`).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    predicted_boxes: torch.FloatTensor | None = None
    region_boxes: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class CMALImageTextRetrievalOutput(ModelOutput):
    r"""
    Output of [`CMALForImageTextRetrieval`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Cross-entropy of the match/no-match decision (or the loss of `config.problem_type`), returned when
            `labels` is given.
        logits (`torch.FloatTensor` of shape `(batch_size, config.num_labels)`):
            Image-text matching scores; with 2 labels, index 1 means "the pair matches".
        scores (`torch.FloatTensor` of shape `(batch_size,)`):
            `logits[:, 1] - logits[:, 0]`, the log-odds of a match, the number to rank candidates by (2-way heads).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    scores: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class CMALAssociativePromptOutput(ModelOutput):
    r"""
    The associative prompt layer's result (DESIGN §1, step 3).

    Args:
        hybrid_states (`torch.FloatTensor` of shape `(batch_size, text_len + num_regions, hidden_size)`):
            The hybrid associative prompt: text then region slots, swapped slots filled from the other modality,
            every slot with its modality type embedding; the unified encoder's input.
        token_swapped, region_swapped (`torch.BoolTensor` of shape `(batch_size, text_len)` / `(batch_size, num_regions)`):
            Slots whose own feature was masked and replaced.
        token_partner, region_partner (`torch.LongTensor`, same shapes):
            For each swapped slot, the index of the partner whose feature filled it; -1 elsewhere.
    """

    hybrid_states: torch.FloatTensor | None = None
    token_swapped: torch.BoolTensor | None = None
    region_swapped: torch.BoolTensor | None = None
    token_partner: torch.LongTensor | None = None
    region_partner: torch.LongTensor | None = None


@dataclass
class CMALAssociativeMappingOutput(ModelOutput):
    r"""
    Scores of the associative mapping head (DESIGN §1, step 5), at every slot.

    Args:
        token_logits (`torch.FloatTensor` of shape `(batch_size, text_len, vocab_size)`):
            Vocabulary scores of every text slot (AMC-token; MLM reads the same head).
        region_logits (`torch.FloatTensor` of shape `(batch_size, num_regions, num_concepts)`):
            Concept scores of every region slot (AMC-region; MRM's concept part reads the same head).
        pointer_logits (`torch.FloatTensor` of shape `(batch_size, text_len, num_regions)`):
            Score of every region as the partner of every token (AMC-pointer); padded regions get the dtype's minimum.
    """

    token_logits: torch.FloatTensor | None = None
    region_logits: torch.FloatTensor | None = None
    pointer_logits: torch.FloatTensor | None = None


# ----------------------------------------------------------------------------------------------
# Step 0 (raw images only): regions from a detector
# ----------------------------------------------------------------------------------------------


def boxes_to_visual_pos(boxes: torch.Tensor) -> torch.Tensor:
    """Normalised `(x1, y1, x2, y2)` boxes -> the 7-d box vector `(x1, y1, x2, y2, w, h, area)` (UNITER's)."""
    width, height = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    return torch.cat([boxes, width.unsqueeze(-1), height.unsqueeze(-1), (width * height).unsqueeze(-1)], dim=-1)


class CMALRegionDetector(nn.Module):
    """Raw-image path: a transformers object detector turns `pixel_values` into the top-K regions.

    A region's feature is the detector's decoder output for its query (the vector its box and class
    were read from), its box the predicted box, its concept the predicted label mapped by name onto
    `config.concept_names` (-1 when the name is not a concept), its score the label's probability.
    Any DETR-family detector works (`CMALConfig.from_detector`, `load_detector_weights`).
    """

    def __init__(self, config: CMALConfig):
        super().__init__()
        from transformers import AutoConfig, AutoModelForObjectDetection

        # a copy: transformers 5.0's RTDetrConfig pops `model_type` out of the nested backbone dict it is given
        detector_config = AutoConfig.for_model(**copy.deepcopy(config.detector_config))
        self.model = AutoModelForObjectDetection.from_config(detector_config)
        self.num_regions = config.detector_num_regions
        self.score_threshold = config.detector_score_threshold
        self.trainable = config.train_detector
        concept_of = {name: i for i, name in enumerate(config.concept_names)}
        labels = [detector_config.id2label[i] for i in range(detector_config.num_labels)]
        self.concept_of_label = [concept_of.get(name, -1) for name in labels]
        self.label_to_concept = nn.Buffer(torch.tensor(self.concept_of_label), persistent=False)
        # RT-DETR's feature maps halve down to its largest stride, and its encoder needs them exact
        self.stride = max(getattr(detector_config, "feat_strides", None) or [1])
        if not self.trainable:
            self.model.requires_grad_(False)

    def train(self, mode: bool = True):
        # A frozen detector stays in eval mode (batch norm statistics, dropout) whatever its parent does.
        return super().train(mode and self.trainable)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        height, width = pixel_values.shape[-2:]
        if height % self.stride or width % self.stride:
            raise ValueError(
                f"`pixel_values` are {height}x{width}, but this detector reads sides that are multiples of {self.stride} "
                f"(its largest stride): set the image processor's `size` to such a size, e.g. "
                f"{{'height': {max(self.stride, round(height / self.stride) * self.stride)}, "
                f"'width': {max(self.stride, round(width / self.stride) * self.stride)}}}"
            )
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            outputs = self.model(pixel_values=pixel_values)
        logits = outputs.logits
        num_labels = self.label_to_concept.shape[0]
        # DETR and YOLOS score labels with a softmax over labels + "no object"; RT-DETR, Deformable and
        # Conditional DETR with independent sigmoids.
        probs = logits.softmax(-1)[..., :num_labels] if logits.shape[-1] == num_labels + 1 else logits.sigmoid()
        scores, labels = probs.max(-1)
        scores, order = scores.topk(min(self.num_regions, scores.shape[1]), dim=1)
        query_states = outputs.last_hidden_state[:, -logits.shape[1] :]  # YOLOS: the trailing detection tokens

        def take(tensor):
            index = order.view(*order.shape, *([1] * (tensor.dim() - 2)))
            return tensor.gather(1, index.expand(-1, -1, *tensor.shape[2:]))

        center_x, center_y, width, height = take(outputs.pred_boxes).unbind(-1)
        boxes = torch.stack(
            [center_x - width / 2, center_y - height / 2, center_x + width / 2, center_y + height / 2], dim=-1
        ).clamp(0.0, 1.0)
        return {
            "visual_feats": take(query_states),
            "visual_pos": boxes_to_visual_pos(boxes),
            "visual_attention_mask": (scores >= self.score_threshold).long(),
            "region_concept_ids": self.label_to_concept[take(labels)],
            "region_scores": scores,
        }


# ----------------------------------------------------------------------------------------------
# Step 1: the anchor operator ⊕
# ----------------------------------------------------------------------------------------------


def anchor_operator(
    token_concept_ids: torch.LongTensor,
    region_concept_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    visual_attention_mask: torch.Tensor | None = None,
) -> torch.BoolTensor:
    """The anchor operator ⊕ as one tensor op.

    `anchor_map[b, t, r] = token_concept_ids[b, t] == region_concept_ids[b, r] >= 0`, restricted to
    real (unmasked) tokens and regions. Shapes: `(B, T)`, `(B, N)` -> `(B, T, N)`.
    """
    token_ids = token_concept_ids.unsqueeze(2)
    anchor_map = (token_ids == region_concept_ids.unsqueeze(1)) & (token_ids >= 0)
    if attention_mask is not None:
        anchor_map &= attention_mask.bool().unsqueeze(2)
    if visual_attention_mask is not None:
        anchor_map &= visual_attention_mask.bool().unsqueeze(1)
    return anchor_map


# ----------------------------------------------------------------------------------------------
# The transformer layer every encoder is made of (BERT's names, so BERT weights load one-to-one)
# ----------------------------------------------------------------------------------------------


class CMALPacking:
    """Where the real slots of a padded `(batch_size, length)` batch lie, for layers that skip the padding
    (`config.padding_free`).

    The real slots are packed row by row into one sequence of `total` slots, so example `b` holds slots
    `cu_seqlens[b]:cu_seqlens[b + 1]` (flash attention's variable-length contract). Attention without
    variable-length kernels re-pads each layer's queries, keys and values and uses `mask`, the padded path's.
    """

    def __init__(self, config: CMALConfig, attention_mask: torch.Tensor, dtype: torch.dtype):
        self.batch_size, self.length = attention_mask.shape
        real = attention_mask.bool()
        self.indices = real.reshape(-1).nonzero().squeeze(1)
        lengths = real.sum(1, dtype=torch.int32)
        self.cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        self.max_seqlen = int(lengths.max()) if len(lengths) else 0
        self.varlen = "flash" in (config._attn_implementation or "")
        # the mask of the padded path, made from a zero-width stand-in for the padded hidden states
        shape_carrier = torch.empty(self.batch_size, self.length, 0, dtype=dtype, device=attention_mask.device)
        self.mask = None if self.varlen else create_bidirectional_mask(config, shape_carrier, attention_mask)

    @property
    def total(self) -> int:
        return len(self.indices)

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """`(batch_size, length, ...)` -> `(total, ...)`."""
        return padded.reshape(self.batch_size * self.length, *padded.shape[2:]).index_select(0, self.indices)

    def pad(self, packed: torch.Tensor) -> torch.Tensor:
        """`(total, ...)` -> `(batch_size, length, ...)`, zeros in the padded slots."""
        padded = packed.new_zeros(self.batch_size * self.length, *packed.shape[1:]).index_copy(0, self.indices, packed)
        return padded.view(self.batch_size, self.length, *packed.shape[1:])


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None and attention_mask.dtype == torch.bool:  # a mask made for sdpa: True = attend
        attn_weights = attn_weights.masked_fill(~attention_mask, torch.finfo(attn_weights.dtype).min)
    elif attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class CMALSelfAttention(nn.Module):
    """Bidirectional multi-head self-attention dispatched through transformers' attention registry."""

    def __init__(self, config: CMALConfig):
        super().__init__()
        self.config = config
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.scaling = self.attention_head_size**-0.5
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.is_causal = False  # read by the sdpa backend: an encoder must never be causal

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        packing: CMALPacking | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`hidden_states` is `(batch_size, length, hidden_size)`, or `(total, hidden_size)` with a `packing`."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.attention_head_size)
        query, key, value = (proj(hidden_states).view(hidden_shape) for proj in (self.query, self.key, self.value))
        varlen = {}
        if packing is None:
            query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        elif packing.varlen:  # one packed sequence and its boundaries: flash's variable-length kernels
            query, key, value = query.transpose(0, 1)[None], key.transpose(0, 1)[None], value.transpose(0, 1)[None]
            varlen = {
                "cu_seq_lens_q": packing.cu_seqlens, "cu_seq_lens_k": packing.cu_seqlens,
                "max_length_q": packing.max_seqlen, "max_length_k": packing.max_seqlen,
            }  # fmt: skip
        else:  # re-padded for this attention only
            query, key, value = (packing.pad(x).transpose(1, 2) for x in (query, key, value))
            attention_mask = packing.mask

        # Only eager materialises the weights; asking for them switches this call to eager.
        attention_interface: Callable = eager_attention_forward
        if self.config._attn_implementation not in (None, "eager") and not kwargs.get("output_attentions"):
            # transformers reads this file to decide whether `set_attn_implementation` may switch a loaded model:
            # newer 5.x look for the `get_interface(` call, 5.0 (which lacks it) for the item lookup.
            if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
                attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                    self.config._attn_implementation, eager_attention_forward
                )
            else:
                attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.dropout.p if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
            **varlen,
        )
        if packing is not None and not packing.varlen:
            attn_output = packing.unpad(attn_output)
        return attn_output.reshape(*input_shape, -1), attn_weights


class CMALSelfOutput(nn.Module):
    def __init__(self, config: CMALConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class CMALAttention(nn.Module):
    def __init__(self, config: CMALConfig):
        super().__init__()
        self.self = CMALSelfAttention(config)
        self.output = CMALSelfOutput(config)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Unpack[TransformersKwargs]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_output, attn_weights = self.self(hidden_states, attention_mask, **kwargs)
        return self.output(attn_output, hidden_states), attn_weights


class CMALIntermediate(nn.Module):
    def __init__(self, config: CMALConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))


class CMALOutput(nn.Module):
    def __init__(self, config: CMALConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class CMALLayer(GradientCheckpointingLayer):
    """A post-LN BERT layer; sub-module names match BERT's so BERT weights load one-to-one."""

    def __init__(self, config: CMALConfig):
        super().__init__()
        self.attention = CMALAttention(config)
        self.intermediate = CMALIntermediate(config)
        self.output = CMALOutput(config)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Unpack[TransformersKwargs]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attention_output, attn_weights = self.attention(hidden_states, attention_mask, **kwargs)
        layer_output = self.output(self.intermediate(attention_output), attention_output)
        return layer_output, attn_weights


# ----------------------------------------------------------------------------------------------
# Step 2: the uni-modal semantic encoders ("hypersphere spaces")
# ----------------------------------------------------------------------------------------------


class CMALTextEmbeddings(nn.Module):
    """Word + position + segment embeddings, named as in BERT so BERT weights load one-to-one."""

    def __init__(self, config: CMALConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.position_ids = nn.Buffer(torch.arange(config.max_position_embeddings).expand((1, -1)), persistent=False)

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        token_type_ids: torch.LongTensor,
        inputs_embeds: torch.FloatTensor | None = None,
        position_ids: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        if position_ids is None:
            position_ids = self.position_ids[:, : inputs_embeds.shape[1]]
        embeddings = inputs_embeds + self.position_embeddings(position_ids) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(embeddings))


class CMALVisualEmbeddings(nn.Module):
    """Region feature and box projections, each layer-normalised, then summed (as in UNITER).

    A masked region (masked region modelling) keeps its box but its feature becomes a learnt `mask_embedding`,
    as a masked word becomes [MASK]: a zero feature would be a point LayerNorm maps nowhere useful (measured:
    gradient norms of 3e4-7e4 on the projection bias at the first step).
    """

    def __init__(self, config: CMALConfig):
        super().__init__()
        self.feature_projection = nn.Linear(config.visual_feat_dim, config.hidden_size)
        self.feature_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mask_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.box_projection = nn.Linear(config.visual_pos_dim, config.hidden_size)
        self.box_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, visual_feats: torch.Tensor, visual_pos: torch.Tensor, masked_regions: torch.BoolTensor | None = None
    ) -> torch.Tensor:
        features = self.feature_layer_norm(self.feature_projection(visual_feats))
        if masked_regions is None:  # in the graph all the same: DDP and gradient checks expect every parameter used
            masked_regions = torch.zeros(features.shape[:-1], dtype=torch.bool, device=features.device)
        features = torch.where(masked_regions.unsqueeze(-1), self.mask_embedding.to(features.dtype), features)
        boxes = self.box_layer_norm(self.box_projection(visual_pos))
        return self.dropout(self.LayerNorm(features + boxes))


class CMALHypersphere(nn.Module):
    """Puts a modality's features on a sphere of learnable radius (identity when disabled).

    Both modalities live on spheres so that the associative prompt layer can put a region feature
    into a word slot (and back) without a scale mismatch.
    """

    def __init__(self, config: CMALConfig):
        super().__init__()
        self.enabled = config.hypersphere
        # 1-D, not a scalar: FSDP2 shards only tensors with a dimension (older checkpoints' scalars are converted on load)
        self.scale = nn.Parameter(torch.full((1,), float(config.hypersphere_init_scale))) if self.enabled else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return hidden_states
        return F.normalize(hidden_states, dim=-1) * self.scale


class CMALUnimodalEncoder(nn.Module):
    """One modality's semantic encoder: its embeddings, `num_layers` transformer layers, then the hypersphere.

    Built twice by `CMALModel`: over text (`CMALTextEmbeddings`, `config.num_text_layers`) and over regions
    (`CMALVisualEmbeddings`, `config.num_visual_layers`).
    """

    def __init__(self, config: CMALConfig, embeddings: nn.Module, num_layers: int):
        super().__init__()
        self.config = config
        self.embeddings = embeddings
        self.layer = nn.ModuleList([CMALLayer(config) for _ in range(num_layers)])
        if not config.unimodal_final_layer_norm and num_layers > 0:
            # After a LayerNorm every position already has (nearly) the sphere's norm: the sphere would only rescale.
            self.layer[-1].output.LayerNorm = nn.Identity()
        self.hypersphere = CMALHypersphere(config)

    def forward(
        self,
        *embedding_inputs,
        attention_mask: torch.Tensor,
        packing: CMALPacking | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """`embedding_inputs` go to the embeddings, per slot: `(batch_size, length, ...)`, or `(total, ...)` with a
        `packing` (the output is re-padded); `attention_mask` is the (batch_size, length) 0/1 mask."""
        hidden_states = self.embeddings(*embedding_inputs)
        if packing is not None:
            if packing.total > 0:
                for layer in self.layer:
                    hidden_states, _ = layer(hidden_states, packing.mask, packing=packing, **kwargs)
            return packing.pad(self.hypersphere(hidden_states))
        if hidden_states.shape[1] > 0 and len(self.layer) > 0:  # an image may have no regions
            mask = create_bidirectional_mask(self.config, hidden_states, attention_mask)
            for layer in self.layer:
                hidden_states, _ = layer(hidden_states, mask, **kwargs)
        return self.hypersphere(hidden_states)


# ----------------------------------------------------------------------------------------------
# Step 3: the cross-modal associative prompt layer
# ----------------------------------------------------------------------------------------------


class CMALAssociativePromptLayer(nn.Module):
    """Cross-modal associative prompt layer: anchor-point masking and swap-feature filling.

    Chosen anchors lose their own feature: a token slot takes the feature of its partner region
    (the highest-scoring region of the same concept), a region slot the feature of its partner
    token (the first word piece of the first matching word). Every slot then gets its modality type
    embedding (text, region, or *prompt* for filled slots): the hybrid associative prompt.
    """

    def __init__(self, config: CMALConfig):
        super().__init__()
        self.config = config
        self.modality_type_embeddings = nn.Embedding(3, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def select_anchor_concepts(self, batch_size: int, device: torch.device) -> torch.BoolTensor | None:
        """Which concepts of each example to swap: random in training, all or none in evaluation."""
        if self.training:
            if self.config.anchor_mask_prob == 0:
                return None
            return torch.rand(batch_size, self.config.num_concepts, device=device) < self.config.anchor_mask_prob
        if self.config.prompt_at_inference:
            return torch.ones(batch_size, self.config.num_concepts, dtype=torch.bool, device=device)
        return None

    def forward(
        self,
        text_features: torch.Tensor,
        region_features: torch.Tensor,
        anchor_map: torch.BoolTensor,
        token_concept_ids: torch.LongTensor,
        region_concept_ids: torch.LongTensor,
        region_scores: torch.Tensor | None,
        anchor_selection: torch.BoolTensor | None,
    ) -> CMALAssociativePromptOutput:
        batch_size, text_len, hidden_size = text_features.shape
        num_regions = region_features.shape[1]
        device = text_features.device
        token_swapped = torch.zeros(batch_size, text_len, dtype=torch.bool, device=device)
        region_swapped = torch.zeros(batch_size, num_regions, dtype=torch.bool, device=device)
        token_partner = torch.full((batch_size, text_len), -1, dtype=torch.long, device=device)
        region_partner = torch.full((batch_size, num_regions), -1, dtype=torch.long, device=device)

        if anchor_selection is None:
            anchor_selection = self.select_anchor_concepts(batch_size, device)
        if anchor_selection is not None and num_regions > 0:
            token_swapped = anchor_map.any(dim=2) & anchor_selection.gather(1, token_concept_ids.clamp(min=0))
            region_swapped = anchor_map.any(dim=1) & anchor_selection.gather(1, region_concept_ids.clamp(min=0))
            # argmax returns the first maximum: ties go to the lowest region / the first word piece.
            scores = region_scores if region_scores is not None else torch.zeros_like(region_concept_ids, dtype=text_features.dtype)
            partner_scores = scores.unsqueeze(1).masked_fill(~anchor_map, float("-inf"))
            best_region = partner_scores.argmax(dim=2)
            first_token = anchor_map.to(torch.uint8).argmax(dim=1)
            token_partner = torch.where(token_swapped, best_region, token_partner)
            region_partner = torch.where(region_swapped, first_token, region_partner)

            if self.config.anchor_fill == "swap":
                fill_text = region_features.gather(1, best_region.unsqueeze(-1).expand(-1, -1, hidden_size))
                fill_regions = text_features.gather(1, first_token.unsqueeze(-1).expand(-1, -1, hidden_size))
            else:  # "mask": the slot keeps no feature of either modality
                fill_text = fill_regions = text_features.new_zeros(())
            text_features = torch.where(token_swapped.unsqueeze(-1), fill_text, text_features)
            region_features = torch.where(region_swapped.unsqueeze(-1), fill_regions, region_features)

        type_ids = torch.cat(
            [
                torch.where(token_swapped, PROMPT_TYPE, TEXT_TYPE),
                torch.where(region_swapped, PROMPT_TYPE, REGION_TYPE),
            ],
            dim=1,
        )
        hybrid = torch.cat([text_features, region_features], dim=1) + self.modality_type_embeddings(type_ids)
        return CMALAssociativePromptOutput(
            hybrid_states=self.dropout(self.LayerNorm(hybrid)),
            token_swapped=token_swapped,
            region_swapped=region_swapped,
            token_partner=token_partner,
            region_partner=region_partner,
        )


# ----------------------------------------------------------------------------------------------
# Step 4: the unified semantic encoder
# ----------------------------------------------------------------------------------------------


class CMALUnifiedLayer(CMALLayer):
    """A layer of the unified encoder: the layers whose outputs `CMALModel` reports as `hidden_states` and
    `attentions` (the uni-modal encoders' layers are plain `CMALLayer`s)."""


class CMALUnifiedEncoder(nn.Module):
    """`config.num_hidden_layers` layers over the hybrid associative prompt `[CLS] text [SEP] regions`."""

    def __init__(self, config: CMALConfig):
        super().__init__()
        self.layer = nn.ModuleList([CMALUnifiedLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        packing: CMALPacking | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """With a `packing`, the padded `hidden_states` run packed and come back re-padded."""
        if packing is not None:
            hidden_states, attention_mask, kwargs = packing.unpad(hidden_states), packing.mask, {**kwargs, "packing": packing}
        for layer in self.layer:
            hidden_states, _ = layer(hidden_states, attention_mask, **kwargs)
        return hidden_states if packing is None else packing.pad(hidden_states)


class CMALPooler(nn.Module):
    def __init__(self, config: CMALConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


# ----------------------------------------------------------------------------------------------
# Step 5: associative mapping classification (and the heads it shares with MLM/MRM)
# ----------------------------------------------------------------------------------------------


class CMALPredictionHeadTransform(nn.Module):
    def __init__(self, config: CMALConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class CMALLMPredictionHead(nn.Module):
    """Vocabulary head, tied to the word embeddings; its parameters are named as BERT's `cls.predictions`."""

    def __init__(self, config: CMALConfig):
        super().__init__()
        self.transform = CMALPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states))


class CMALRegionPredictionHead(nn.Module):
    """Transform then a linear output: region feature regression, concept classification or a region score."""

    def __init__(self, config: CMALConfig, out_features: int):
        super().__init__()
        self.transform = CMALPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, out_features)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states))


class CMALPointerHead(nn.Module):
    """Scores every region as the partner of every token with a scaled bilinear product."""

    def __init__(self, config: CMALConfig):
        super().__init__()
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.scaling = config.hidden_size**-0.5

    def forward(self, text_states: torch.Tensor, region_states: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.query(text_states), self.key(region_states).transpose(1, 2)) * self.scaling


def _mask_padded_regions(logits: torch.Tensor, region_mask: torch.Tensor | None) -> torch.Tensor:
    """Give padded regions (last dim of `logits`) the dtype's minimum so softmax ignores them."""
    if region_mask is None:
        return logits
    shape = (region_mask.shape[0],) + (1,) * (logits.dim() - 2) + (region_mask.shape[1],)
    return logits.masked_fill(~region_mask.bool().view(shape), torch.finfo(logits.dtype).min)


def _cross_entropy_where(logits: torch.Tensor, labels: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the selected positions; an exact 0 (with a graph) when none is selected.

    A plain `cross_entropy` with every target ignored returns NaN; a batch without anchors, or
    without masked words, is normal in CMAL and must not poison the total loss.
    """
    if not bool(where.any()):
        return (logits * 0.0).sum()
    return F.cross_entropy(logits[where].float(), labels[where])


class CMALAssociativeMappingHead(nn.Module):
    """Associative mapping classification: at each slot the swap filled, recover the mapping it hid.

    A swapped token slot predicts its original word (`token_head`, the vocabulary head tied to the word
    embeddings) and, optionally, which region filled it (`pointer_head`); a swapped region slot predicts
    its region's concept (`region_head`). MLM and MRM's concept part read the token and region heads too.
    """

    def __init__(self, config: CMALConfig):
        super().__init__()
        self.config = config
        self.token_head = CMALLMPredictionHead(config)
        self.region_head = CMALRegionPredictionHead(config, config.num_concepts)
        self.pointer_head = CMALPointerHead(config)

    def forward(
        self, text_states: torch.Tensor, region_states: torch.Tensor, region_mask: torch.Tensor
    ) -> CMALAssociativeMappingOutput:
        return CMALAssociativeMappingOutput(
            token_logits=self.token_head(text_states),
            region_logits=self.region_head(region_states),
            pointer_logits=_mask_padded_regions(self.pointer_head(text_states, region_states), region_mask),
        )

    def loss(
        self,
        scores: CMALAssociativeMappingOutput,
        input_ids: torch.LongTensor | None,
        region_concept_ids: torch.LongTensor | None,
        token_swapped: torch.Tensor,
        region_swapped: torch.Tensor,
        token_partner: torch.LongTensor,
        examples: torch.BoolTensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The AMC parts whose weight in the config is > 0, each unweighted. The targets of the swapped slots
        (`token_swapped`/`region_swapped`, 0/1) are the word they held (`input_ids`), their region's concept
        and the partner region that filled them (`token_partner`); only `examples` (default: all) count."""
        config, losses = self.config, {}
        token_swapped, region_swapped = token_swapped.bool(), region_swapped.bool()
        if examples is not None:
            token_swapped, region_swapped = token_swapped & examples[:, None], region_swapped & examples[:, None]
        if config.amc_token_weight > 0 and input_ids is not None:
            losses["amc_token_loss"] = _cross_entropy_where(scores.token_logits, input_ids, token_swapped)
        if config.amc_region_weight > 0 and region_concept_ids is not None:
            losses["amc_region_loss"] = _cross_entropy_where(
                scores.region_logits, region_concept_ids.clamp(min=0), region_swapped
            )
        if config.amc_pointer_weight > 0:
            losses["amc_pointer_loss"] = _cross_entropy_where(
                scores.pointer_logits, token_partner.clamp(min=0), token_swapped
            )
        return losses


# ----------------------------------------------------------------------------------------------
# The other pre-training objectives, one function each
# ----------------------------------------------------------------------------------------------


def masked_language_modeling_loss(token_logits: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
    """Cross-entropy at the masked word pieces (`labels` != -100)."""
    return _cross_entropy_where(token_logits, labels, labels != -100)


def masked_region_modeling_losses(
    feature_predictions: torch.Tensor,
    concept_logits: torch.Tensor,
    visual_feats: torch.Tensor,
    region_concept_ids: torch.LongTensor | None,
    region_soft_labels: torch.Tensor | None,
    masked: torch.BoolTensor,
) -> dict[str, torch.Tensor]:
    """MRM at the `masked` regions: feature regression (MSE) and concept classification (cross-entropy on
    the tags, or KL divergence to the detector's class distributions when `region_soft_labels` are given)."""
    losses = {}
    if bool(masked.any()):
        target = visual_feats.to(feature_predictions.dtype)[masked]
        losses["mrm_feature_loss"] = F.mse_loss(feature_predictions[masked].float(), target.float())
    else:
        losses["mrm_feature_loss"] = (feature_predictions * 0.0).sum()
    if region_soft_labels is not None:
        log_probs = F.log_softmax(concept_logits[masked].float(), dim=-1)
        soft = region_soft_labels[masked].float()
        losses["mrm_concept_loss"] = (
            F.kl_div(log_probs, soft, reduction="batchmean") if bool(masked.any()) else (log_probs * 0.0).sum()
        )
    elif region_concept_ids is not None:
        losses["mrm_concept_loss"] = _cross_entropy_where(
            concept_logits, region_concept_ids.clamp(min=0), masked & (region_concept_ids >= 0)
        )
    return losses


def image_text_contrastive_loss(
    text_embeds: torch.Tensor, image_embeds: torch.Tensor, pairs: torch.BoolTensor, temperature: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, loss): symmetric InfoNCE (text->image and image->text, every in-batch pair) between unit
    vectors, over the `pairs` (true pairs with at least one region); 0 when fewer than two pairs are left."""
    logits = text_embeds @ image_embeds.t() / temperature
    if int(pairs.sum()) < 2:
        return logits, (logits * 0.0).sum()
    kept = logits[pairs][:, pairs].float()
    targets = torch.arange(kept.shape[0], device=kept.device)
    return logits, (F.cross_entropy(kept, targets) + F.cross_entropy(kept.t(), targets)) / 2


# The inputs that describe the image, not the text: what a hard negative takes from another example.
_IMAGE_INPUTS = ("visual_feats", "visual_pos", "visual_attention_mask", "region_concept_ids", "region_scores")


def hard_negative_pairs(
    similarity: torch.Tensor, pairs: torch.BoolTensor, visual_feats: torch.Tensor
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """(text rows, image rows) of ALBEF's ITM hard negatives among the true `pairs` of a batch: for each text
    an image, for each image a text, drawn in proportion to the softmax of the ITC `similarity` logits (text x
    image). Two captions of one image share its features, so identical images are never drawn as negatives;
    a row with no other image draws nothing."""
    rows = pairs.nonzero().flatten()
    if len(rows) < 2:
        return rows[:0], rows[:0]
    logits = similarity[rows][:, rows].float()
    features = visual_feats[rows].flatten(1).float()
    same = torch.cdist(features, features) == 0
    logits = logits.masked_fill(same, float("-inf"))
    has = ~same.all(dim=1)  # `same` is symmetric: the same rows have another image and another text
    texts, images = [], []
    for scores, flip in ((logits, False), (logits.t(), True)):  # per text over images, per image over texts
        drawn = torch.multinomial(scores[has].softmax(dim=1), 1).flatten()
        kept = rows[has.nonzero().flatten()]
        texts.append(rows[drawn] if flip else kept)
        images.append(kept if flip else rows[drawn])
    return torch.cat(texts), torch.cat(images)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


# The inputs every CMAL forward takes, documented once (`auto_docstring(custom_args=...)`).
CMAL_INPUTS_DOCSTRING = r"""
    input_ids (`torch.LongTensor` of shape `(batch_size, text_len)`):
        Word-piece ids of `[CLS] text [SEP]`, from the processor (any BERT-uncased tokenizer).
    visual_feats (`torch.FloatTensor` of shape `(batch_size, num_regions, visual_feat_dim)`):
        Region features; `num_regions` may be 0. Without `visual_feats`, `visual_pos` and `pixel_values`
        the text is encoded with no regions.
    visual_pos (`torch.FloatTensor` of shape `(batch_size, num_regions, visual_pos_dim)`):
        Normalised boxes `(x1, y1, x2, y2, w, h, area)`.
    visual_attention_mask (`torch.Tensor` of shape `(batch_size, num_regions)`, *optional*):
        1 for real regions, 0 for padding.
    token_concept_ids (`torch.LongTensor` of shape `(batch_size, text_len)`, *optional*):
        Concept id of each token (-1 for none), from the processor's anchor lexicon.
    region_concept_ids (`torch.LongTensor` of shape `(batch_size, num_regions)`, *optional*):
        Concept id of each region's detected tag (-1 for none).
    region_scores (`torch.FloatTensor` of shape `(batch_size, num_regions)`, *optional*):
        Detector confidences; pick the partner region of a swapped token.
    pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`, *optional*):
        Raw images from the processor, instead of the five region inputs above; needs a detector
        (`config.detector_config`).
    masked_regions (`torch.BoolTensor` of shape `(batch_size, num_regions)`, *optional*):
        Regions whose feature is replaced by the learnt mask embedding (masked region modelling); they never act
        as anchors.
    anchor_selection (`torch.BoolTensor` of shape `(batch_size, num_concepts)`, *optional*):
        Which anchor concepts to swap, overriding the random choice of training and the
        `prompt_at_inference` rule of evaluation.
"""


@auto_docstring
class CMALPreTrainedModel(PreTrainedModel):
    config: CMALConfig
    config_class = CMALConfig
    base_model_prefix = "cmal"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    # by class name: the unified encoder's layers are a subclass of CMALLayer, named apart
    _no_split_modules = [
        "CMALTextEmbeddings", "CMALVisualEmbeddings", "CMALAssociativePromptLayer", "CMALLayer", "CMALUnifiedLayer"
    ]
    # The heads of one checkpoint kind that another does not have: pre-training's when a task head is fine-tuned from
    # it, a task head's when `AutoModel` reads a fine-tuned folder. Unused there by design, so not reported; a missing
    # key (a new head) still is.
    _keys_to_ignore_on_load_unexpected = [
        r"^(mapping_head|feature_head|itm_head|text_projection|image_projection|itc_logit_scale|classifier|region_scorer)(\.|$)"
    ]
    # Masks come from `create_bidirectional_mask`, so each backend gets its own kind; eager and sdpa are tested.
    _supports_sdpa = True
    _can_record_outputs = {
        "hidden_states": OutputRecorder(CMALUnifiedLayer, index=0),
        "attentions": OutputRecorder(CMALUnifiedLayer, index=1),
    }

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, CMALHypersphere) and module.scale is not None:
            init.constant_(module.scale, self.config.hypersphere_init_scale)
        elif isinstance(module, CMALLMPredictionHead):
            init.zeros_(module.bias)
        elif isinstance(module, CMALTextEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
        elif isinstance(module, CMALVisualEmbeddings):
            init.normal_(module.mask_embedding, std=self.config.initializer_range)
        elif isinstance(module, CMALForPreTraining) and module.itc_logit_scale is not None:
            init.constant_(module.itc_logit_scale, -math.log(self.config.itc_temperature))
        elif isinstance(module, CMALRegionDetector):
            init.copy_(module.label_to_concept, torch.tensor(module.concept_of_label))

    @classmethod
    def from_pretrained(cls, *args, key_mapping: dict[str, str] | None = None, **kwargs):
        """As `PreTrainedModel.from_pretrained`; checkpoints with the parameter names and scalar radii of older
        CMAL releases load too (`LEGACY_KEY_MAPPING`, `CMALScalarToVector`), and are re-saved in today's
        layout. What a local folder lacks is said in one sentence; a cut-short weights file is named as such
        (safetensors alone says "incomplete metadata"); weights that are not finite, or a float weight stored as
        integers (cast silently otherwise), are refused with the tensors named."""
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        if isinstance(source, (str, os.PathLike)) and kwargs.get("config") is None:
            check_model_folder(source, kwargs.get("subfolder") or "")
        try:
            loaded = super().from_pretrained(*args, key_mapping={**LEGACY_KEY_MAPPING, **(key_mapping or {})}, **kwargs)
        except SafetensorError as error:
            raise OSError(
                f"The weights of {str(source)!r} are not a complete safetensors file ({error}): an interrupted save "
                "or download cut them short; save or download them again"
            ) from None
        # transformers saves by reverting the renamings it loaded with: ours would write old names back
        # (transformers 5.0 even writes their regex escapes, `cmal.text_hypersphere\.scale`)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        check_loaded_weights(model, source)
        model._weight_conversions = [
            transform for transform in getattr(model, "_weight_conversions", None) or []
            if not set(transform.source_patterns) <= LEGACY_KEY_MAPPING.keys()
        ] or None  # fmt: skip
        return loaded

    def load_detector_weights(self, detector: PreTrainedModel) -> None:
        """Copy a pre-trained detector (e.g. `RTDetrForObjectDetection.from_pretrained("PekingU/rtdetr_r50vd")`)
        into this model's raw-image path; it is then saved inside this model's checkpoint.

        Build the model from `CMALConfig.from_detector(detector.config, ...)` so that sizes and labels agree.
        """
        base = getattr(self, self.base_model_prefix, self)
        if base.detector is None:
            raise ValueError("This model has no detector: build it from `CMALConfig.from_detector(detector.config)`")
        if detector.config.model_type != self.config.detector_config["model_type"]:
            raise ValueError(
                f"`detector` is a {detector.config.model_type!r} model, but config.detector_config describes "
                f"{self.config.detector_config['model_type']!r}"
            )
        base.detector.model.load_state_dict(detector.state_dict())

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also map the shared auto classes, so that any CMAL checkpoint loads its encoder with `AutoModel`,
        and ship the head's pipeline (`pipeline_cmal.py`, named in `config.custom_pipelines`)."""
        shared = {auto_class: f"modeling_cmal.{cls.__name__}" for auto_class, cls in CMAL_AUTO_MAP.items()}
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **shared}
        pipeline_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pipeline_cmal.py")
        task = CMAL_PIPELINE_TASKS.get(type(self))
        if task is not None and os.path.isfile(pipeline_file):
            name, pipeline_class = task
            self.config.custom_pipelines = {
                name: {"impl": f"pipeline_cmal.{pipeline_class}", "pt": [CMAL_HEAD_AUTO_CLASSES[type(self)]], "type": "multimodal"}
            }
        elif task is not None:  # loaded as remote code without its pipeline file: keep what the config says
            logger.warning(f"pipeline_cmal.py is not beside {__file__}; the saved checkpoint has no pipeline code")
        output = super().save_pretrained(save_directory, *args, **kwargs)
        if task is not None and os.path.isfile(pipeline_file):
            shutil.copy(pipeline_file, os.path.join(save_directory, "pipeline_cmal.py"))
        return output


@auto_docstring(custom_intro="The bare CMAL encoder: uni-modal encoders -> associative prompt layer -> unified encoder.")
class CMALModel(CMALPreTrainedModel):
    def __init__(self, config: CMALConfig, add_pooling_layer: bool = True):
        r"""
        add_pooling_layer (`bool`, *optional*, defaults to `True`):
            Whether to add the tanh pooler over the unified `[CLS]` slot.
        """
        super().__init__(config)
        self.config = config
        self.text_encoder = CMALUnimodalEncoder(config, CMALTextEmbeddings(config), config.num_text_layers)
        self.visual_encoder = CMALUnimodalEncoder(config, CMALVisualEmbeddings(config), config.num_visual_layers)
        self.associative_prompt = CMALAssociativePromptLayer(config)
        self.unified_encoder = CMALUnifiedEncoder(config)
        self.pooler = CMALPooler(config) if add_pooling_layer else None
        self.detector = CMALRegionDetector(config) if config.detector_config is not None else None
        self.post_init()

    def get_input_embeddings(self):
        return self.text_encoder.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.text_encoder.embeddings.word_embeddings = value

    def detect_regions(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the detector: `pixel_values` (from the processor) -> the region inputs of `forward`.

        `training/extract_regions.py` calls this too, so extracted feature stores and the
        raw-image path give the same regions.
        """
        if self.detector is None:
            raise ValueError(
                "`pixel_values` need a detector, but this model has none (config.detector_config is None): "
                "pass precomputed regions (`visual_feats`, `visual_pos`), or build the model from "
                "`CMALConfig.from_detector(...)` and copy the detector in with `load_detector_weights`"
            )
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"`pixel_values` must have shape (batch_size, 3, height, width), got {shape}")
        if not pixel_values.is_floating_point() or not bool(torch.isfinite(pixel_values).all()):
            raise ValueError(f"`pixel_values` must be finite floating-point values, got dtype {pixel_values.dtype}")
        detector_dtype = next(self.detector.model.parameters()).dtype
        regions = self.detector(pixel_values.to(detector_dtype))
        return {key: value.to(self.dtype) if value.is_floating_point() else value for key, value in regions.items()}

    @capture_outputs
    @auto_docstring(custom_args=CMAL_INPUTS_DOCSTRING)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        visual_feats: torch.FloatTensor | None = None,
        visual_pos: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        visual_attention_mask: torch.Tensor | None = None,
        token_concept_ids: torch.LongTensor | None = None,
        region_concept_ids: torch.LongTensor | None = None,
        region_scores: torch.FloatTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        masked_regions: torch.BoolTensor | None = None,
        anchor_selection: torch.BoolTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CMALModelOutput:
        unknown = sorted(set(kwargs) - set(TransformersKwargs.__annotations__))
        if unknown:  # a misspelt input would otherwise be dropped without a word
            raise TypeError(f"CMALModel.forward() got unexpected arguments {unknown}")
        if pixel_values is not None:
            given = dict(
                visual_feats=visual_feats, visual_pos=visual_pos, visual_attention_mask=visual_attention_mask,
                region_concept_ids=region_concept_ids, region_scores=region_scores,
            )  # fmt: skip
            if any(value is not None for value in given.values()):
                both = sorted(name for name, value in given.items() if value is not None)
                raise ValueError(f"Pass either `pixel_values` or precomputed regions, not both (got {both} too)")
            text = input_ids if input_ids is not None else inputs_embeds
            if isinstance(text, torch.Tensor) and text.dim() >= 2 and len(pixel_values) != len(text):
                raise ValueError(
                    f"`pixel_values` must hold one image per text: batch_size {len(text)}, got {len(pixel_values)}"
                )
            regions = self.detect_regions(pixel_values)
            visual_feats, visual_pos = regions["visual_feats"], regions["visual_pos"]
            visual_attention_mask, region_scores = regions["visual_attention_mask"], regions["region_scores"]
            region_concept_ids = regions["region_concept_ids"]
        elif visual_feats is None and visual_pos is None:  # text only: the text is encoded with no regions
            text = input_ids if input_ids is not None else inputs_embeds
            if isinstance(text, torch.Tensor) and text.dim() >= 2:
                visual_feats = torch.zeros(len(text), 0, self.config.visual_feat_dim, device=text.device)
                visual_pos = torch.zeros(len(text), 0, self.config.visual_pos_dim, device=text.device)
        validate_model_inputs(
            self.config, input_ids, inputs_embeds, visual_feats, visual_pos, attention_mask, token_type_ids,
            visual_attention_mask, token_concept_ids, region_concept_ids, region_scores, masked_regions, anchor_selection,
        )  # fmt: skip

        batch_size, text_len = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        num_regions = visual_feats.shape[1]
        device = visual_feats.device
        dtype = self.text_encoder.embeddings.word_embeddings.weight.dtype
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, text_len, dtype=torch.long, device=device)
        if token_type_ids is None:
            token_type_ids = torch.zeros(batch_size, text_len, dtype=torch.long, device=device)
        if visual_attention_mask is None:
            visual_attention_mask = torch.ones(batch_size, num_regions, dtype=torch.long, device=device)
        if token_concept_ids is None:
            token_concept_ids = torch.full((batch_size, text_len), -1, dtype=torch.long, device=device)
        if region_concept_ids is None:
            region_concept_ids = torch.full((batch_size, num_regions), -1, dtype=torch.long, device=device)
        visual_feats, visual_pos = visual_feats.to(dtype), visual_pos.to(dtype)
        region_mask = visual_attention_mask.bool()
        region_boxes = visual_pos[..., :4] if self.config.visual_pos_dim >= 4 else None
        given_concepts = region_concept_ids
        if masked_regions is not None:  # a masked region shows only its box, and is never an anchor
            masked_regions = masked_regions.bool()
            region_concept_ids = region_concept_ids.masked_fill(masked_regions, -1)

        # Packed encoders (config.padding_free) skip padding; captured layer outputs keep the padded layout.
        capturing = any(kwargs.get(name, getattr(self.config, name, False)) for name in ("output_attentions", "output_hidden_states"))
        text_inputs = (input_ids, token_type_ids, inputs_embeds)
        region_inputs = (visual_feats, visual_pos, masked_regions)
        text_packing = region_packing = None
        if self.config.padding_free and not capturing:
            text_packing = CMALPacking(self.config, attention_mask, dtype)
            region_packing = CMALPacking(self.config, visual_attention_mask, dtype)
            position_ids = self.text_encoder.embeddings.position_ids[:, :text_len].expand(batch_size, -1)
            text_inputs = tuple(None if x is None else text_packing.unpad(x) for x in (*text_inputs, position_ids))
            region_inputs = tuple(None if x is None else region_packing.unpad(x) for x in region_inputs)

        # 1. The anchor operator; 2. the uni-modal encoders, each onto its hypersphere.
        anchor_map = anchor_operator(token_concept_ids, region_concept_ids, attention_mask, visual_attention_mask)
        text_features = self.text_encoder(*text_inputs, attention_mask=attention_mask, packing=text_packing, **kwargs)
        region_features = self.visual_encoder(
            *region_inputs, attention_mask=visual_attention_mask, packing=region_packing, **kwargs
        )
        text_embeds = F.normalize(text_features[:, 0], dim=-1)
        region_weights = visual_attention_mask.to(dtype).unsqueeze(-1)
        mean_region = (region_features * region_weights).sum(1) / region_weights.sum(1).clamp(min=1.0)
        image_embeds = F.normalize(mean_region, dim=-1)

        # 3. The associative prompt layer; 4. the unified encoder.
        prompt = self.associative_prompt(
            text_features,
            region_features,
            anchor_map,
            token_concept_ids,
            region_concept_ids,
            None if region_scores is None else region_scores.to(dtype),
            None if anchor_selection is None else anchor_selection.bool(),
        )
        joint_attention_mask = torch.cat([attention_mask, visual_attention_mask], dim=1)
        if text_packing is None:
            joint_mask, joint_packing = create_bidirectional_mask(self.config, prompt.hybrid_states, joint_attention_mask), None
        else:
            joint_mask, joint_packing = None, CMALPacking(self.config, joint_attention_mask, dtype)
        sequence_output = self.unified_encoder(prompt.hybrid_states, joint_mask, packing=joint_packing, **kwargs)
        return CMALModelOutput(
            last_hidden_state=sequence_output,
            pooler_output=self.pooler(sequence_output) if self.pooler is not None else None,
            text_features=text_features,
            region_features=region_features,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            anchor_map=anchor_map.long(),
            token_swapped=prompt.token_swapped.long(),
            region_swapped=prompt.region_swapped.long(),
            token_partner=prompt.token_partner,
            region_partner=prompt.region_partner,
            region_boxes=region_boxes,
            region_concept_ids=given_concepts,
            region_scores=region_scores,
            region_mask=region_mask.long(),
        )


# Each pre-training loss and the config field that weighs it in the total.
PRETRAINING_LOSS_WEIGHTS = {
    "mlm_loss": "mlm_weight",
    "mrm_feature_loss": "mrm_weight",
    "mrm_concept_loss": "mrm_weight",
    "itm_loss": "itm_weight",
    "amc_token_loss": "amc_token_weight",
    "amc_region_loss": "amc_region_weight",
    "amc_pointer_loss": "amc_pointer_weight",
    "itc_loss": "itc_weight",
}


@auto_docstring(
    custom_intro="""
    CMAL with every pre-training objective: MLM, MRM, ITM, AMC (token/region/pointer) and ITC. Each loss is
    returned on its own and combined with the weights of the config. Masking words and regions is the data
    collator's job (`labels`, `masked_regions`); the anchor swap and its AMC targets come from the model.
    """
)
class CMALForPreTraining(CMALPreTrainedModel):
    _tied_weights_keys = {
        "mapping_head.token_head.decoder.weight": "cmal.text_encoder.embeddings.word_embeddings.weight",
        "mapping_head.token_head.decoder.bias": "mapping_head.token_head.bias",
    }

    def __init__(self, config: CMALConfig):
        super().__init__(config)
        self.cmal = CMALModel(config)
        self.mapping_head = CMALAssociativeMappingHead(config)
        self.feature_head = CMALRegionPredictionHead(config, config.visual_feat_dim)
        self.itm_head = nn.Linear(config.hidden_size, 2)
        # ITC as ALBEF/CLIP: projections of the uni-modal vectors and a learnt temperature (log 1/t, clamped).
        # Only built with ITC on, so that no parameter without gradient stalls DDP.
        self.text_projection = self.image_projection = self.itc_logit_scale = None
        if config.itc_weight > 0:
            self.text_projection = nn.Linear(config.hidden_size, config.itc_projection_dim)
            self.image_projection = nn.Linear(config.hidden_size, config.itc_projection_dim)
            self.itc_logit_scale = nn.Parameter(torch.tensor(-math.log(config.itc_temperature)))
        self.post_init()

    def get_output_embeddings(self):
        return self.mapping_head.token_head.decoder

    def set_output_embeddings(self, new_embeddings):
        self.mapping_head.token_head.decoder = new_embeddings
        self.mapping_head.token_head.bias = new_embeddings.bias

    @property
    def itc_temperature(self) -> torch.Tensor:
        """The learnt ITC temperature, clamped to [0.001, 0.5] as in ALBEF."""
        return self.itc_logit_scale.exp().reciprocal().clamp(0.001, 0.5)

    @can_return_tuple
    @auto_docstring(
        custom_args=CMAL_INPUTS_DOCSTRING
        + r"""
    labels (`torch.LongTensor` of shape `(batch_size, text_len)`, *optional*):
        MLM targets: the original id at masked word pieces, -100 elsewhere.
    region_soft_labels (`torch.FloatTensor` of shape `(batch_size, num_regions, num_concepts)`, *optional*):
        Detector class distributions; the MRM concept loss becomes a KL divergence to them.
    itm_labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
        1 when the image and the text belong together, 0 for a mismatched pair. Only matched pairs are
        targets of MLM, MRM and AMC.
    """
    )
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        visual_feats: torch.FloatTensor | None = None,
        visual_pos: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        visual_attention_mask: torch.Tensor | None = None,
        token_concept_ids: torch.LongTensor | None = None,
        region_concept_ids: torch.LongTensor | None = None,
        region_scores: torch.FloatTensor | None = None,
        masked_regions: torch.BoolTensor | None = None,
        anchor_selection: torch.BoolTensor | None = None,
        labels: torch.LongTensor | None = None,
        region_soft_labels: torch.FloatTensor | None = None,
        itm_labels: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CMALForPreTrainingOutput:
        r"""
        Two passes, where the literature computes each objective (UNITER, ALBEF): MLM, MRM and AMC on the
        *masked* pass (masked words and regions, anchors swapped); ITM and ITC on a *clean* pass (the original
        words, no masked region, no swap), since on masked inputs ITC learns which modality was masked and ITM
        does not learn (both measured). The clean pass runs only when ITM or ITC is on and something was masked
        or swapped, at the cost of one more forward pass; the outputs' scores and masks are the masked pass's,
        `itm_logits`/`itc_logits` the clean one's. `itm_logits` come whenever the ITM head was trained
        (`itm_weight > 0`), with or without `itm_labels`.
        """
        config = self.config
        regions = dict(
            visual_feats=visual_feats, visual_pos=visual_pos, attention_mask=attention_mask,
            token_type_ids=token_type_ids, visual_attention_mask=visual_attention_mask,
            token_concept_ids=token_concept_ids, region_concept_ids=region_concept_ids, region_scores=region_scores,
        )  # fmt: skip
        outputs = self.cmal(
            input_ids, masked_regions=masked_regions, anchor_selection=anchor_selection, inputs_embeds=inputs_embeds,
            return_dict=True, **regions, **kwargs,
        )  # fmt: skip
        batch_size, text_len = outputs.token_swapped.shape
        num_regions = outputs.region_swapped.shape[1]
        if labels is not None:
            check_labels("labels", labels, (batch_size, text_len), config.vocab_size)
        if itm_labels is not None:
            check_labels("itm_labels", itm_labels, (batch_size,), 2)
        if region_soft_labels is not None:
            check_labels("region_soft_labels", region_soft_labels, (batch_size, num_regions, config.num_concepts))
        real_regions = outputs.region_mask.bool()
        matched = None if itm_labels is None else itm_labels == 1
        text_states, region_states = outputs.last_hidden_state[:, :text_len], outputs.last_hidden_state[:, text_len:]
        scores = self.mapping_head(text_states, region_states, real_regions)
        region_feature_predictions = self.feature_head(region_states)

        losses = {}
        if labels is not None and config.mlm_weight > 0:
            losses["mlm_loss"] = masked_language_modeling_loss(scores.token_logits, labels)
        if masked_regions is not None and config.mrm_weight > 0:
            masked = masked_regions.bool() & real_regions
            if matched is not None:  # a mismatched pair's regions are no targets: its text does not describe them
                masked = masked & matched.unsqueeze(1)
            losses |= masked_region_modeling_losses(
                region_feature_predictions, scores.region_logits, visual_feats, region_concept_ids, region_soft_labels,
                masked,
            )  # fmt: skip
        losses |= self.mapping_head.loss(
            scores, input_ids, region_concept_ids, outputs.token_swapped, outputs.region_swapped, outputs.token_partner,
            examples=matched,
        )  # fmt: skip

        itm_logits = itc_logits = text_embeds = image_embeds = None
        if config.itm_weight > 0 or config.itc_weight > 0:  # scored without labels too: a user asks for the match score
            masked_words = labels is not None and bool((labels != -100).any())
            masked_any = masked_regions is not None and bool(masked_regions.any())
            swapped = bool(outputs.token_swapped.any() or outputs.region_swapped.any())
            clean_ids = torch.where(labels != -100, labels, input_ids) if masked_words and input_ids is not None else input_ids
            no_swap = torch.zeros(batch_size, config.num_concepts, dtype=torch.bool, device=real_regions.device)
            if masked_words or masked_any or swapped:
                clean = self.cmal(clean_ids, anchor_selection=no_swap, inputs_embeds=inputs_embeds, return_dict=True, **regions)
            else:  # nothing was masked or swapped (e.g. scoring pairs in evaluation): the masked pass is the clean one
                clean = outputs
            itm_logits = self.itm_head(clean.pooler_output)
            itm_scored, itm_targets = [itm_logits], [itm_labels]
            if config.itc_weight > 0:
                # Contrast true pairs that have at least one region; a mismatched pair is no positive.
                pairs = real_regions.any(dim=1) if matched is None else real_regions.any(dim=1) & matched
                text_embeds = F.normalize(self.text_projection(clean.text_embeds), dim=-1)
                image_embeds = F.normalize(self.image_projection(clean.image_embeds), dim=-1)
                itc_logits, losses["itc_loss"] = image_text_contrastive_loss(
                    text_embeds, image_embeds, pairs, self.itc_temperature
                )
                if itm_labels is not None and config.itm_weight > 0 and config.itm_hard_negatives and self.training:
                    texts, images = hard_negative_pairs(itc_logits.detach(), pairs, visual_feats)
                    if len(texts):
                        inputs = dict(regions, input_ids=clean_ids, inputs_embeds=inputs_embeds)
                        negatives = self.cmal(
                            anchor_selection=no_swap[texts], return_dict=True,
                            **{k: None if v is None else v[images if k in _IMAGE_INPUTS else texts] for k, v in inputs.items()},
                        )  # fmt: skip
                        itm_scored.append(self.itm_head(negatives.pooler_output))
                        itm_targets.append(itm_labels.new_zeros(len(texts)))
            if itm_labels is not None and config.itm_weight > 0:
                losses["itm_loss"] = F.cross_entropy(torch.cat(itm_scored).float(), torch.cat(itm_targets))

        loss = sum(getattr(config, PRETRAINING_LOSS_WEIGHTS[name]) * value for name, value in losses.items()) if losses else None
        return CMALForPreTrainingOutput(
            loss=loss,
            **losses,
            prediction_logits=scores.token_logits,
            region_feature_predictions=region_feature_predictions,
            region_concept_logits=scores.region_logits,
            pointer_logits=scores.pointer_logits,
            itm_logits=itm_logits,
            itc_logits=itc_logits,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            anchor_map=outputs.anchor_map,
            token_swapped=outputs.token_swapped,
            region_swapped=outputs.region_swapped,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


def _classification_loss(config: CMALConfig, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss of `config.problem_type`, as transformers' sequence classifiers define it (inferred when unset:
    regression for one label, single-label for integer labels, multi-label for float ones)."""
    problem_type = config.problem_type or (
        "regression" if config.num_labels == 1
        else "multi_label_classification" if labels.is_floating_point()
        else "single_label_classification"
    )  # fmt: skip
    if problem_type == "single_label_classification":
        check_labels("labels", labels, logits.shape[:1], config.num_labels)
        return F.cross_entropy(logits.float(), labels)
    if problem_type == "multi_label_classification":
        check_labels("labels", labels, logits.shape)
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    if not isinstance(labels, torch.Tensor) or not labels.is_floating_point() or labels.numel() != logits.numel():
        got = f"dtype {labels.dtype}, shape {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(
            f"`labels` must be floating-point regression targets, {config.num_labels} per example "
            f"(config.num_labels), got {got}"
        )
    return F.mse_loss(logits.float(), labels.float().view_as(logits))


@auto_docstring(
    custom_intro="""
    VQA head: an MLP on the pooled output, one sigmoid score per answer of `config.id2label`. Trained with
    binary cross-entropy on soft scores, so `logits` mean the same with or without `labels`, and
    `pipeline("visual-question-answering")`'s sigmoid gives each answer's score.
    """
)
class CMALForQuestionAnswering(CMALPreTrainedModel):
    def __init__(self, config: CMALConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.cmal = CMALModel(config)
        self.classifier = nn.Sequential(
            nn.Linear(config.hidden_size, config.hidden_size * 2),
            nn.LayerNorm(config.hidden_size * 2, eps=config.layer_norm_eps),
            nn.GELU(),
            nn.Linear(config.hidden_size * 2, config.num_labels),
        )
        self.post_init()

    @can_return_tuple
    @auto_docstring(
        custom_args=CMAL_INPUTS_DOCSTRING
        + r"""
    labels (`torch.FloatTensor` of shape `(batch_size, num_labels)`, *optional*):
        Soft answer scores in [0, 1] (VQA: min(#annotators who gave the answer / 3, 1)).
    """
    )
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        visual_feats: torch.FloatTensor | None = None,
        visual_pos: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        visual_attention_mask: torch.Tensor | None = None,
        token_concept_ids: torch.LongTensor | None = None,
        region_concept_ids: torch.LongTensor | None = None,
        region_scores: torch.FloatTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        labels: torch.FloatTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutput:
        outputs = self.cmal(
            input_ids, visual_feats, visual_pos,
            attention_mask=attention_mask, token_type_ids=token_type_ids,
            visual_attention_mask=visual_attention_mask, token_concept_ids=token_concept_ids,
            region_concept_ids=region_concept_ids, region_scores=region_scores, pixel_values=pixel_values,
            inputs_embeds=inputs_embeds, return_dict=True, **kwargs,
        )  # fmt: skip
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            check_labels("labels", labels, logits.shape)
            # Mean over answers times their number: the sum over answers averaged over the batch (ViLT, BAN).
            loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float()) * self.num_labels
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


@auto_docstring(
    custom_intro="""
    One label per image-text pair (SNLI-VE: entailment / neutral / contradiction, or any image+text label), on
    the pooled output; the loss follows `config.problem_type` (single-label, multi-label or regression).
    """
)
class CMALForImageTextClassification(CMALPreTrainedModel):
    def __init__(self, config: CMALConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.cmal = CMALModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    @auto_docstring(
        custom_args=CMAL_INPUTS_DOCSTRING
        + r"""
    labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
        Class indices into `config.id2label`; float `(batch_size, num_labels)` targets for multi-label
        classification or regression (`config.problem_type`).
    """
    )
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        visual_feats: torch.FloatTensor | None = None,
        visual_pos: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        visual_attention_mask: torch.Tensor | None = None,
        token_concept_ids: torch.LongTensor | None = None,
        region_concept_ids: torch.LongTensor | None = None,
        region_scores: torch.FloatTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutput:
        outputs = self.cmal(
            input_ids, visual_feats, visual_pos,
            attention_mask=attention_mask, token_type_ids=token_type_ids,
            visual_attention_mask=visual_attention_mask, token_concept_ids=token_concept_ids,
            region_concept_ids=region_concept_ids, region_scores=region_scores, pixel_values=pixel_values,
            inputs_embeds=inputs_embeds, return_dict=True, **kwargs,
        )  # fmt: skip
        logits = self.classifier(self.dropout(outputs.pooler_output))
        loss = _classification_loss(self.config, logits, labels) if labels is not None else None
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


@auto_docstring(
    custom_intro="""
    NLVR2: one sentence, two images; the two pooled outputs are concatenated and classified (the loss follows
    `config.problem_type`). Region inputs carry an extra image axis of size 2: `visual_feats` is
    `(batch_size, 2, num_regions, visual_feat_dim)`, and so on for the other region inputs.
    """
)
class CMALForVisualReasoning(CMALPreTrainedModel):
    def __init__(self, config: CMALConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.cmal = CMALModel(config)
        self.classifier = nn.Sequential(
            nn.Linear(config.hidden_size * 2, config.hidden_size * 2),
            nn.LayerNorm(config.hidden_size * 2, eps=config.layer_norm_eps),
            nn.GELU(),
            nn.Linear(config.hidden_size * 2, config.num_labels),
        )
        self.post_init()

    @can_return_tuple
    @auto_docstring(
        custom_args=CMAL_INPUTS_DOCSTRING
        + r"""
    labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
        1 if the sentence is true of the pair (or targets of `config.problem_type`). `hidden_states` and
        `attentions` are returned for the `2 * batch_size` (text, image) rows, example `b`'s images at rows
        `2b` and `2b + 1`.
    """
    )
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        visual_feats: torch.FloatTensor | None = None,
        visual_pos: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        visual_attention_mask: torch.Tensor | None = None,
        token_concept_ids: torch.LongTensor | None = None,
        region_concept_ids: torch.LongTensor | None = None,
        region_scores: torch.FloatTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutput:
        images, name, layout = (
            (pixel_values, "pixel_values", "(batch_size, 2, 3, height, width)")
            if pixel_values is not None
            else (visual_feats, "visual_feats", "(batch_size, 2, num_regions, visual_feat_dim)")
        )
        if not isinstance(images, torch.Tensor) or images.dim() != len(layout.split(",")) or images.shape[1] != 2:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"`{name}` must have shape {layout} for the two images of NLVR2, got {shape}")
        batch_size = images.shape[0]

        def pairs_to_rows(name, value, text_side=False):
            if value is None:
                return None
            if text_side:
                return value.repeat_interleave(2, dim=0)
            if not isinstance(value, torch.Tensor) or tuple(value.shape[:2]) != (batch_size, 2):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"`{name}` must start with dimensions (batch_size, 2) = ({batch_size}, 2), got {shape}")
            return value.flatten(0, 1)

        outputs = self.cmal(
            pairs_to_rows("input_ids", input_ids, text_side=True),
            pairs_to_rows("visual_feats", visual_feats),
            pairs_to_rows("visual_pos", visual_pos),
            attention_mask=pairs_to_rows("attention_mask", attention_mask, text_side=True),
            token_type_ids=pairs_to_rows("token_type_ids", token_type_ids, text_side=True),
            visual_attention_mask=pairs_to_rows("visual_attention_mask", visual_attention_mask),
            token_concept_ids=pairs_to_rows("token_concept_ids", token_concept_ids, text_side=True),
            region_concept_ids=pairs_to_rows("region_concept_ids", region_concept_ids),
            region_scores=pairs_to_rows("region_scores", region_scores),
            pixel_values=pairs_to_rows("pixel_values", pixel_values),
            inputs_embeds=pairs_to_rows("inputs_embeds", inputs_embeds, text_side=True),
            return_dict=True,
            **kwargs,
        )
        logits = self.classifier(outputs.pooler_output.reshape(batch_size, -1))
        loss = _classification_loss(self.config, logits, labels) if labels is not None else None
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


@auto_docstring(
    custom_intro="Referring expression comprehension: one score per region, cross-entropy over the regions."
)
class CMALForReferringExpression(CMALPreTrainedModel):
    def __init__(self, config: CMALConfig):
        super().__init__(config)
        self.cmal = CMALModel(config, add_pooling_layer=False)
        self.region_scorer = CMALRegionPredictionHead(config, 1)
        self.post_init()

    @can_return_tuple
    @auto_docstring(
        custom_args=CMAL_INPUTS_DOCSTRING
        + r"""
    labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
        Index of the referred region.
    """
    )
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        visual_feats: torch.FloatTensor | None = None,
        visual_pos: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        visual_attention_mask: torch.Tensor | None = None,
        token_concept_ids: torch.LongTensor | None = None,
        region_concept_ids: torch.LongTensor | None = None,
        region_scores: torch.FloatTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CMALReferringExpressionOutput:
        outputs = self.cmal(
            input_ids, visual_feats, visual_pos,
            attention_mask=attention_mask, token_type_ids=token_type_ids,
            visual_attention_mask=visual_attention_mask, token_concept_ids=token_concept_ids,
            region_concept_ids=region_concept_ids, region_scores=region_scores, pixel_values=pixel_values,
            inputs_embeds=inputs_embeds, return_dict=True, **kwargs,
        )  # fmt: skip
        region_mask = outputs.region_mask.bool()
        batch_size, num_regions = region_mask.shape
        region_states = outputs.last_hidden_state[:, -num_regions:] if num_regions else outputs.last_hidden_state[:, :0]
        logits = _mask_padded_regions(self.region_scorer(region_states).squeeze(-1), region_mask)
        predicted_boxes = None
        if outputs.region_boxes is not None and num_regions > 0:
            best = logits.argmax(-1)
            predicted_boxes = outputs.region_boxes[torch.arange(batch_size, device=best.device), best]
        loss = None
        if labels is not None:
            if num_regions == 0:
                raise ValueError("`labels` name a referred region, but the examples have no regions (num_regions 0)")
            check_labels("labels", labels, (batch_size,), num_regions)
            target_real = region_mask.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
            if not bool((target_real | (labels == -100)).all()):
                raise ValueError("`labels` must point at a real region; one points at a padded region")
            loss = F.cross_entropy(logits.float(), labels)
        return CMALReferringExpressionOutput(
            loss=loss,
            logits=logits,
            predicted_boxes=predicted_boxes,
            region_boxes=outputs.region_boxes,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


@auto_docstring(
    custom_intro="""
    Image-text matching, trainable: a classifier on the pooled output, by default 2-way as pre-training's ITM
    (index 1: the pair matches). With `num_labels=2` its `itm_head` has the name and shape of
    `CMALForPreTraining.itm_head`, so a pre-trained ITM head loads into it. Rank candidates by `scores`;
    report recall@K over a candidate pool. Other `num_labels` and `problem_type`s train as any sequence
    classifier (e.g. graded relevance).
    """
)
class CMALForImageTextRetrieval(CMALPreTrainedModel):
    def __init__(self, config: CMALConfig):
        super().__init__(config)
        self.cmal = CMALModel(config)
        self.itm_head = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    @auto_docstring(
        custom_args=CMAL_INPUTS_DOCSTRING
        + r"""
    labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
        1 for a matching pair, 0 otherwise (or targets of `config.problem_type`).
    """
    )
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        visual_feats: torch.FloatTensor | None = None,
        visual_pos: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        visual_attention_mask: torch.Tensor | None = None,
        token_concept_ids: torch.LongTensor | None = None,
        region_concept_ids: torch.LongTensor | None = None,
        region_scores: torch.FloatTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CMALImageTextRetrievalOutput:
        outputs = self.cmal(
            input_ids, visual_feats, visual_pos,
            attention_mask=attention_mask, token_type_ids=token_type_ids,
            visual_attention_mask=visual_attention_mask, token_concept_ids=token_concept_ids,
            region_concept_ids=region_concept_ids, region_scores=region_scores, pixel_values=pixel_values,
            inputs_embeds=inputs_embeds, return_dict=True, **kwargs,
        )  # fmt: skip
        logits = self.itm_head(outputs.pooler_output)
        loss = _classification_loss(self.config, logits, labels) if labels is not None else None
        return CMALImageTextRetrievalOutput(
            loss=loss,
            logits=logits,
            scores=logits[:, 1] - logits[:, 0] if logits.shape[-1] == 2 else None,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


# Auto classes. Each head saves its own entry (`register_for_auto_class`); `CMALPreTrainedModel.save_pretrained`
# adds the shared ones, so that any CMAL checkpoint also loads its encoder with `AutoModel`.
CMAL_AUTO_MAP = {
    "AutoModel": CMALModel,
    "AutoModelForPreTraining": CMALForPreTraining,
    "AutoModelForVisualQuestionAnswering": CMALForQuestionAnswering,
    "AutoModelForSequenceClassification": CMALForImageTextClassification,
}
CMAL_HEAD_AUTO_CLASSES = {
    **{model_class: auto_class for auto_class, model_class in CMAL_AUTO_MAP.items()},
    # No auto class fits these tasks better; a checkpoint of one maps the named auto class to itself.
    CMALForVisualReasoning: "AutoModelForSequenceClassification",
    CMALForImageTextRetrieval: "AutoModelForSequenceClassification",
    CMALForReferringExpression: "AutoModelForTokenClassification",
}


# The pipeline (in pipeline_cmal.py) each fine-tuned head names in `config.custom_pipelines` when saved.
CMAL_PIPELINE_TASKS = {
    CMALForQuestionAnswering: ("visual-question-answering", "CMALVisualQuestionAnsweringPipeline"),
    CMALForImageTextClassification: ("visual-entailment", "CMALVisualEntailmentPipeline"),
    CMALForVisualReasoning: ("visual-reasoning", "CMALVisualReasoningPipeline"),
    CMALForReferringExpression: ("referring-expression", "CMALReferringExpressionPipeline"),
    CMALForImageTextRetrieval: ("image-text-retrieval", "CMALImageTextRetrievalPipeline"),
}


CMALConfig.register_for_auto_class()
for _model_class, _auto_class in CMAL_HEAD_AUTO_CLASSES.items():
    _model_class.register_for_auto_class(_auto_class)


__all__ = [
    "CMALPreTrainedModel",
    "CMALModel",
    "CMALForPreTraining",
    "CMALForQuestionAnswering",
    "CMALForImageTextClassification",
    "CMALForVisualReasoning",
    "CMALForReferringExpression",
    "CMALForImageTextRetrieval",
    "CMALModelOutput",
    "CMALForPreTrainingOutput",
    "CMALReferringExpressionOutput",
    "CMALImageTextRetrievalOutput",
    "anchor_operator",
]
