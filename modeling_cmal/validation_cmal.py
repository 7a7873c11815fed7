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
"""CMAL's checks at its boundaries: every input of `CMALModel.forward` (`validate_model_inputs`), the labels of
each head (`check_labels`), and what `from_pretrained` reads (`check_model_folder`, `check_loaded_weights`). Each
error names the argument, what was expected and what came. A sibling of `modeling_cmal.py`, which imports it, so
every saved folder carries it (transformers copies a modeling file's relative imports)."""

import os

import torch
from safetensors import safe_open
from transformers.modeling_utils import PreTrainedModel

from .configuration_cmal import CMALConfig


def validate_model_inputs(
    config: CMALConfig,
    input_ids,
    inputs_embeds,
    visual_feats,
    visual_pos,
    attention_mask,
    token_type_ids,
    visual_attention_mask,
    token_concept_ids,
    region_concept_ids,
    region_scores,
    masked_regions,
    anchor_selection,
) -> None:
    """Check every input of `CMALModel.forward`.

    Checks of values (ranges, finiteness, empty texts) need the data: each only queues a 0-d "bad" flag,
    and all queued flags are read in one host sync (`_raise_first_bad`), before any later shape error and
    at the end, so that the first failing check in the order below raises, as if each ran at once.
    """
    pending = []  # (0-d bool tensor: the check failed, callable raising its error), in check order

    def fail(error: Exception):
        _raise_first_bad(pending)
        raise error

    if (input_ids is None) == (inputs_embeds is None):
        fail(ValueError("Pass exactly one of `input_ids` and `inputs_embeds`"))
    text, text_name = (input_ids, "input_ids") if input_ids is not None else (inputs_embeds, "inputs_embeds")
    for name, value in ((text_name, text), ("visual_feats", visual_feats), ("visual_pos", visual_pos)):
        if not isinstance(value, torch.Tensor):
            fail(ValueError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}"))
    if input_ids is not None and input_ids.dim() != 2:
        fail(ValueError(f"`input_ids` must have shape (batch_size, text_len), got shape {tuple(input_ids.shape)}"))
    if inputs_embeds is not None and (inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size):
        fail(ValueError(
            f"`inputs_embeds` must have shape (batch_size, text_len, config.hidden_size={config.hidden_size}), "
            f"got shape {tuple(inputs_embeds.shape)}"
        ))  # fmt: skip
    batch_size, text_len = text.shape[:2]
    if batch_size == 0:
        fail(ValueError(f"`{text_name}` must hold at least one example, got batch_size 0"))
    if text_len == 0:
        fail(ValueError(
            f"`{text_name}` is empty (text_len 0): every example needs at least a [CLS] token; "
            "tokenize with the processor, which adds [CLS] and [SEP]"
        ))  # fmt: skip
    if input_ids is not None and (input_ids.is_floating_point() or input_ids.dtype == torch.bool):
        fail(ValueError(f"`input_ids` must be an integer tensor, got dtype {input_ids.dtype}"))
    if inputs_embeds is not None and not inputs_embeds.is_floating_point():
        fail(ValueError(f"`inputs_embeds` must be a floating-point tensor, got dtype {inputs_embeds.dtype}"))
    if text_len > config.max_position_embeddings:
        fail(ValueError(
            f"`{text_name}` has {text_len} tokens, more than config.max_position_embeddings "
            f"({config.max_position_embeddings}); truncate the text"
        ))  # fmt: skip
    if input_ids is not None:
        pending.append(_range_check("input_ids", input_ids, 0, config.vocab_size,
                                    f"must lie in [0, {config.vocab_size}) (config.vocab_size)"))  # fmt: skip
    if visual_feats.dim() != 3:
        fail(ValueError(
            f"`visual_feats` must have shape (batch_size, num_regions, {config.visual_feat_dim}), "
            f"got shape {tuple(visual_feats.shape)}"
        ))  # fmt: skip
    num_regions = visual_feats.shape[1]
    text_shape, region_shape = (batch_size, text_len), (batch_size, num_regions)
    # name -> (value, layout in words, expected shape)
    checks = {
        "visual_feats": (visual_feats, "(batch_size, num_regions, config.visual_feat_dim)", (*region_shape, config.visual_feat_dim)),
        "visual_pos": (visual_pos, "(batch_size, num_regions, config.visual_pos_dim)", (*region_shape, config.visual_pos_dim)),
        "attention_mask": (attention_mask, "(batch_size, text_len)", text_shape),
        "token_type_ids": (token_type_ids, "(batch_size, text_len)", text_shape),
        "token_concept_ids": (token_concept_ids, "(batch_size, text_len)", text_shape),
        "visual_attention_mask": (visual_attention_mask, "(batch_size, num_regions)", region_shape),
        "region_concept_ids": (region_concept_ids, "(batch_size, num_regions)", region_shape),
        "region_scores": (region_scores, "(batch_size, num_regions)", region_shape),
        "masked_regions": (masked_regions, "(batch_size, num_regions)", region_shape),
        "anchor_selection": (anchor_selection, "(batch_size, config.num_concepts)", (batch_size, config.num_concepts)),
    }  # fmt: skip
    for name, (value, layout, shape) in checks.items():
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            fail(ValueError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}"))
        if tuple(value.shape) != shape:
            fail(ValueError(
                f"`{name}` must have shape {layout} = {shape} (from `{text_name}` and `visual_feats`), "
                f"got shape {tuple(value.shape)}"
            ))  # fmt: skip
    if num_regions > config.max_regions:
        fail(ValueError(
            f"`visual_feats` has {num_regions} regions, more than config.max_regions ({config.max_regions}); "
            "keep the top regions by detector score"
        ))  # fmt: skip
    floats = {"visual_feats": visual_feats, "visual_pos": visual_pos, "region_scores": region_scores}
    if inputs_embeds is not None:
        floats = {"inputs_embeds": inputs_embeds, **floats}
    for name, value in floats.items():
        if value is None:
            continue
        if not value.is_floating_point():
            fail(ValueError(f"`{name}` must be a floating-point tensor, got dtype {value.dtype}"))
        pending.append(_finite_check(name, value))
    if visual_pos.numel():
        pending.append(_box_check(visual_pos, visual_attention_mask))
    if attention_mask is not None:
        pending.append((~attention_mask.bool().any(dim=1).all(), lambda: _raise_empty_text(attention_mask)))
    if token_type_ids is not None and token_type_ids.numel():
        pending.append(_range_check("token_type_ids", token_type_ids, 0, config.type_vocab_size,
                                    f"must lie in [0, {config.type_vocab_size}) (config.type_vocab_size)"))  # fmt: skip
    for name in ("token_concept_ids", "region_concept_ids"):
        value = checks[name][0]
        if value is None or value.numel() == 0:
            continue
        if value.is_floating_point():
            fail(ValueError(f"`{name}` must be an integer tensor, got dtype {value.dtype}"))
        pending.append(_range_check(
            name, value, -1, config.num_concepts,
            f"must be -1 (no concept) or lie in [0, {config.num_concepts}) (config.num_concepts)",
        ))  # fmt: skip
    _raise_first_bad(pending)


def _raise_first_bad(pending: list) -> None:
    """Read every queued check's flag in one host sync; raise the error of the first that failed
    (a flag may be a cheap bound: its check then confirms before raising)."""
    if not pending:
        return
    bad = torch.stack([flag for flag, _ in pending]).tolist()
    for failed, (_, raise_error) in zip(bad, pending):
        if failed:
            raise_error()
    pending.clear()


def _range_check(name: str, value: torch.Tensor, low: int, high: int, rule: str):
    """A queued check that the values of `value` lie in [low, high)."""
    value_min, value_max = value.min(), value.max()

    def raise_error():
        raise ValueError(f"`{name}` values {rule}, got range [{int(value_min)}, {int(value_max)}]")

    return (value_min < low) | (value_max >= high), raise_error


def _box_check(visual_pos: torch.Tensor, visual_attention_mask: torch.Tensor | None, slack: float = 1e-3):
    """A queued check that every real region's box is normalised `(x1, y1, x2, y2)` in [0, 1] with x2 >= x1 and
    y2 >= y1 (`slack` for rounding): pixel boxes or swapped corners would train on nonsense silently."""
    boxes = visual_pos[..., :4].float()
    if visual_attention_mask is not None:
        boxes = boxes * visual_attention_mask[..., None].to(boxes.dtype)  # padded regions hold anything
    sides = boxes[..., 2:] - boxes[..., :2]
    flag = (boxes.amin() < -slack) | (boxes.amax() > 1 + slack) | (sides.amin() < -slack)

    def raise_error():
        bad = ((boxes < -slack) | (boxes > 1 + slack)).any(-1) | (sides < -slack).any(-1)
        example, region = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"`visual_pos` boxes must be normalised (x1, y1, x2, y2) in [0, 1] with x2 >= x1 and y2 >= y1, got "
            f"{[round(v, 4) for v in boxes[example, region].tolist()]} at example {example}, region {region} (the "
            "processor normalises pixel boxes given `image_size`)"
        )

    return flag, raise_error


def _finite_check(name: str, value: torch.Tensor):
    """A queued finiteness check. A NaN or inf anywhere makes the sum NaN or inf, so a finite sum (one
    reduction, no temporaries; `isfinite` makes four tensor-sized ones) clears the tensor; a sum that
    is not finite, which overflow can cause too, is then checked element by element."""

    def raise_error():
        if bool(torch.isfinite(value).all()):
            return
        bad = (~torch.isfinite(value)).nonzero()[0].tolist()
        raise ValueError(f"`{name}` must be finite, got NaN or inf (first at index {tuple(bad)})")

    return ~torch.isfinite(value.sum(dtype=torch.float32)), raise_error


def _raise_empty_text(attention_mask: torch.Tensor):
    empty = (~attention_mask.bool().any(dim=1)).nonzero()[0, 0].item()
    raise ValueError(f"`attention_mask` masks every token of example {empty}: the text is empty")


def check_labels(name: str, labels: torch.Tensor, shape: tuple, num_classes: int | None = None) -> None:
    """Validate a label tensor at the head boundary (shape, dtype and range)."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor, got {type(labels).__name__}")
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"`{name}` must have shape {tuple(shape)}, got shape {tuple(labels.shape)}")
    if num_classes is None:  # soft scores / distributions
        if not labels.is_floating_point() or not bool(torch.isfinite(labels).all()):
            raise ValueError(f"`{name}` must be finite floating-point scores, got dtype {labels.dtype}")
        if labels.numel() and (float(labels.min()) < 0 or float(labels.max()) > 1):
            raise ValueError(
                f"`{name}` must lie in [0, 1], got range [{float(labels.min()):.4g}, {float(labels.max()):.4g}]"
            )
        return
    if labels.is_floating_point():
        raise ValueError(f"`{name}` must be an integer tensor of class indices, got dtype {labels.dtype}")
    valid = labels[labels != -100]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= num_classes):
        raise ValueError(
            f"`{name}` values must lie in [0, {num_classes}) (or be -100 to ignore), "
            f"got range [{int(valid.min())}, {int(valid.max())}]"
        )


def check_model_folder(source, subfolder: str) -> None:
    """A local path that cannot hold a saved model, said in one sentence (transformers would build a default config
    for a folder without one and fail later in its load report, or unpickle a file given as the folder)."""
    folder = os.path.join(source, subfolder) if subfolder else source
    if os.path.isfile(folder):
        raise OSError(f"{str(folder)!r} is a file; a model path must be a folder holding config.json and model.safetensors "
                      "(what save_pretrained writes), or a Hub repo id")  # fmt: skip
    if os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, "config.json")):
        raise OSError(f"{str(folder)!r} holds no config.json, so it is not a saved model (save_pretrained writes config.json "
                      f"beside the weights); it holds {sorted(os.listdir(folder))[:8]}")  # fmt: skip


def check_loaded_weights(model: PreTrainedModel, source) -> None:
    """Refuse weights a run could not have trained: NaN or infinite values (a diverged save), and float weights
    that a local folder stores as integers or booleans (loading casts them without a word)."""
    state = {name: tensor for name, tensor in model.state_dict().items() if tensor.device.type != "meta"}
    not_finite = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if not_finite:
        raise ValueError(f"The weights of {str(source)!r} hold NaN or infinite values in {len(not_finite)} tensors "
                         f"({', '.join(not_finite[:4])}{', ...' if len(not_finite) > 4 else ''}): a diverged run saved "
                         "them; load an earlier checkpoint")  # fmt: skip
    folder = str(source) if isinstance(source, (str, os.PathLike)) and os.path.isdir(source) else None
    for name in sorted(os.listdir(folder)) if folder else []:
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as stored:
                dtypes = {key: stored.get_slice(key).get_dtype() for key in stored.keys()}
            floats = {key for key, tensor in state.items() if tensor.is_floating_point()}
            wrong = [(key, dtype) for key, dtype in dtypes.items() if not dtype.startswith(("F", "BF"))
                     and {key, key.removeprefix(f"{model.base_model_prefix}.")} & floats]  # fmt: skip
            if wrong:
                raise ValueError(f"{os.path.join(folder, name)} stores float weights as {wrong[0][1]} ({', '.join(k for k, _ in wrong[:4])}): "
                                 "not weights a run saved; save them again in a float dtype")  # fmt: skip
