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
"""Initialise a CMAL model from a BERT checkpoint.

CMAL's text path (text encoder embeddings and layers -> unified encoder) has BERT's module names
below each unit, so BERT layer `i` becomes text layer `i` for `i < num_text_layers` and unified layer
`i - num_text_layers` after that: the text path keeps BERT's depth. The region encoder, the
associative prompt layer and the region heads have no BERT counterpart and keep their init.

The checkpoint is read at the tensor level, not through `BertModel`, so any BERT-architecture
checkpoint works (`BertModel`, `BertForMaskedLM`, `BertForPreTraining`, sentence-transformers
exports, old TF conversions with `LayerNorm.gamma/beta`), from a local folder or a Hub id.

Usage:

```bash
python -m cmal.modeling_cmal.convert_bert_to_cmal --bert google-bert/bert-base-uncased \
    --model_config base --output_dir cmal-base-from-bert
```
"""

import argparse
import json
import re
from dataclasses import dataclass, field

import torch
from transformers.modeling_utils import load_state_dict
from transformers.utils import cached_file

from .configuration_cmal import CMAL_PRESETS, CMALConfig
from .modeling_cmal import CMALForPreTraining, CMALModel, CMALPreTrainedModel


# `encoder.layer.7.attention.self.query.weight` -> module `encoder.layer.7`, tail `attention.self.query.weight`.
BERT_MODULE = re.compile(r"^(embeddings|pooler|cls\.predictions|encoder\.layer\.(\d+))\.(.+)$")
# Parameters whose rows are a vocabulary, positions or segment types: a size mismatch there means
# a different vocabulary or text length, so the overlapping rows are still meaningful.
ROW_TABLES = (
    "word_embeddings.weight",
    "position_embeddings.weight",
    "token_type_embeddings.weight",
    "token_head.decoder.weight",
    "token_head.decoder.bias",
    "token_head.bias",
)
# Where BERT's MLM head (`cls.predictions`) goes: the vocabulary head of the associative mapping head.
LM_HEAD = "mapping_head.token_head."

# Parts of a CMAL model that BERT can initialise; what of them no BERT tensor reaches is reported as new.
BERT_SCOPE = ("text_encoder.embeddings.", "text_encoder.layer.", "unified_encoder.", "pooler.")


def _shape(shape) -> str:
    return "x".join(str(size) for size in shape)


def _module_of(name: str) -> str:
    """The layer (`...layer.N`) or module a parameter belongs to, for grouping the report."""
    match = re.match(r"^(.*\blayer\.\d+)\.", name)
    return match.group(1) if match else name.rsplit(".", 1)[0]


def _grouped(names: list[str]) -> list[str]:
    """One report row per module, `module  (count)`; a lone tensor keeps its full name."""
    groups = {}
    for name in names:
        groups.setdefault(_module_of(name), []).append(name)
    return [members[0] if len(members) == 1 else f"{module}  ({len(members)})" for module, members in groups.items()]


@dataclass
class BertInitReport:
    """What `load_bert_weights` did to each tensor. CMAL names are relative to the model passed in.

    Attributes:
        copied: `(cmal_name, bert_name)` of tensors copied as they are.
        resized: `(cmal_name, bert_name, old_shape, new_shape)` of vocabulary/position/type tables of
            another row count; the overlapping rows were copied, the others keep their init.
        skipped: `(cmal_name, bert_name, reason)` of tensors with a counterpart they could not fill.
        new: CMAL parameters of the text path, pooler and vocabulary head that no BERT tensor maps to.
        unused: BERT tensors with no CMAL counterpart (deeper layers, other heads, buffers).
    """

    copied: list[tuple[str, str]] = field(default_factory=list)
    resized: list[tuple[str, str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Counts, then one row per copied module and per resized, skipped, new or unused tensor group."""
        lines = [
            f"BERT -> CMAL: {len(self.copied)} copied, {len(self.resized)} resized, {len(self.skipped)} skipped, "
            f"{len(self.new)} new, {len(self.unused)} unused"
        ]
        if self.copied:
            groups = {}
            for cmal_name, bert_name in self.copied:
                bert_module = _module_of(bert_name)
                tail_length = len(bert_name) - len(bert_module)  # both names end in the same tail
                key = (bert_module, cmal_name[:-tail_length])
                groups[key] = groups.get(key, 0) + 1
            width = max(len(bert) for bert, _ in groups)
            lines.append("copied (BERT -> CMAL, tensors):")
            lines += [f"  {bert:<{width}} -> {cmal}  ({count})" for (bert, cmal), count in groups.items()]
        if self.resized:
            lines.append("resized (overlapping rows copied):")
            lines += [
                f"  {bert} -> {cmal}  {_shape(old)} -> {_shape(new)}" for cmal, bert, old, new in self.resized
            ]
        if self.skipped:
            lines.append("skipped (left at init):")
            lines += [f"  {bert} -> {cmal}: {reason}" for cmal, bert, reason in self.skipped]
        if self.new:
            lines.append("new (no BERT counterpart, left at init):")
            lines += [f"  {row}" for row in _grouped(self.new)]
        if self.unused:
            lines.append("unused BERT tensors:")
            lines += [f"  {row}" for row in _grouped(self.unused)]
        return "\n".join(lines)

    __str__ = summary


def _load_bert_state_dict(bert_name_or_path: str, revision: str | None, token: str | bool | None) -> dict:
    """Every tensor of the checkpoint, from `model.safetensors`, a sharded safetensors index or `pytorch_model.bin`."""
    kwargs = dict(
        revision=revision,
        token=token,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    if (path := cached_file(bert_name_or_path, "model.safetensors", **kwargs)) is not None:
        return load_state_dict(path)
    if (index := cached_file(bert_name_or_path, "model.safetensors.index.json", **kwargs)) is not None:
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state_dict = {}
        for shard in shards:
            state_dict.update(load_state_dict(cached_file(bert_name_or_path, shard, revision=revision, token=token)))
        return state_dict
    if (path := cached_file(bert_name_or_path, "pytorch_model.bin", **kwargs)) is not None:
        return load_state_dict(path, weights_only=True)  # torch.load(weights_only=True): no pickled code runs
    raise OSError(
        f"`bert_name_or_path` ({bert_name_or_path!r}) has none of model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin (or they are not in the cache while offline)"
    )


def _normalise(name: str) -> str:
    """BERT key as `BertModel` names it: no task-model prefix, `LayerNorm.weight/bias` (not `gamma/beta`)."""
    name = re.sub(r"^(bert|model)\.", "", name)
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))


def _cmal_name(bert_name: str, base_prefix: str, num_text_layers: int) -> str | None:
    """The CMAL parameter a (normalised) BERT tensor maps to; `None` when it has no counterpart."""
    match = BERT_MODULE.match(bert_name)
    if match is None:
        return None
    module, layer, tail = match.groups()
    if module == "cls.predictions":
        return f"{LM_HEAD}{tail}"
    if layer is not None:
        index = int(layer)
        if index < num_text_layers:
            module = f"text_encoder.layer.{index}"
        else:
            module = f"unified_encoder.layer.{index - num_text_layers}"
    elif module == "embeddings":
        module = "text_encoder.embeddings"
    return f"{base_prefix}{module}.{tail}"


def load_bert_weights(
    model: CMALPreTrainedModel,
    bert_name_or_path: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
) -> BertInitReport:
    """Copy a BERT checkpoint's weights into the text path of a CMAL model, in place.

    Args:
        model: a `CMALModel` or any CMAL head (its base model is `model.cmal`). Its config stays as
            it is: tensors are fitted to the model, never the model to the checkpoint.
        bert_name_or_path: a local folder or a Hub id of any BERT-architecture checkpoint.
        revision, token: passed to the Hub download for Hub ids.

    Mapping: `embeddings.*` -> `text_encoder.embeddings.*`; `encoder.layer.i` -> `text_encoder.layer.i`
    for `i < config.num_text_layers`, else `unified_encoder.layer.{i - num_text_layers}`; `pooler.dense` ->
    `pooler.dense`; `cls.predictions.*` -> `mapping_head.token_head.*` when the model has that head.

    A vocabulary, position or segment table of another row count gets its overlapping rows (reported
    as resized); any other shape mismatch, e.g. another hidden size, leaves the tensor at its init
    (reported as skipped). Tensors are written in place with `copy_`, so tied weights stay tied; of
    two BERT tensors that reach one tied parameter the first is copied, the second skipped.

    Returns:
        A `BertInitReport`; `print` it for a table.

    Raises:
        ValueError: the checkpoint has no `embeddings.word_embeddings.weight`, so it is not BERT-like.
        OSError: no weight file was found.
    """
    base = model.base_model
    if not isinstance(base, CMALModel):
        raise TypeError(f"`model` must be a CMALModel or a CMAL head, got {type(model).__name__}")
    base_prefix = "" if base is model else f"{model.base_model_prefix}."

    state_dict = _load_bert_state_dict(bert_name_or_path, revision, token)
    bert = {_normalise(name): tensor for name, tensor in state_dict.items()}
    if "embeddings.word_embeddings.weight" not in bert:
        found = ", ".join(list(bert)[:5]) or "none"
        raise ValueError(
            f"`bert_name_or_path` ({bert_name_or_path!r}) is not a BERT checkpoint: it has no "
            f"`embeddings.word_embeddings.weight` (after stripping a `bert.`/`model.` prefix). First keys: {found}"
        )

    params = dict(model.named_parameters(remove_duplicate=False))
    report = BertInitReport()
    reached = set()  # id() of every parameter some BERT tensor maps to
    filled = {}  # id(parameter) -> (cmal_name, bert_name) of the copy, so a tied parameter is written once
    # Head tensors last: a BERT decoder tied to the word embeddings must not win over the embeddings.
    for bert_name in sorted(bert, key=lambda name: name.startswith("cls.")):
        cmal_name = _cmal_name(bert_name, base_prefix, base.config.num_text_layers)
        if cmal_name not in params:
            report.unused.append(bert_name)
            continue
        param, tensor = params[cmal_name], bert[bert_name]
        reached.add(id(param))
        if id(param) in filled:
            other_cmal, other_bert = filled[id(param)]
            report.skipped.append((cmal_name, bert_name, f"tied to {other_cmal}, already copied from {other_bert}"))
            continue
        old_shape, new_shape = tuple(tensor.shape), tuple(param.shape)
        with torch.no_grad():
            if old_shape == new_shape:
                param.copy_(tensor)
                report.copied.append((cmal_name, bert_name))
            elif cmal_name.endswith(ROW_TABLES) and old_shape[1:] == new_shape[1:]:
                rows = min(old_shape[0], new_shape[0])
                param[:rows].copy_(tensor[:rows])
                report.resized.append((cmal_name, bert_name, old_shape, new_shape))
            else:
                reason = f"shape {_shape(old_shape)} does not fit {_shape(new_shape)}"
                report.skipped.append((cmal_name, bert_name, reason))
                continue
        filled[id(param)] = (cmal_name, bert_name)

    scope = tuple(base_prefix + part for part in BERT_SCOPE) + (LM_HEAD,)
    report.new = [
        name for name, param in model.named_parameters() if name.startswith(scope) and id(param) not in reached
    ]
    return report


def main():
    parser = argparse.ArgumentParser(description="Initialise a CMAL model from a BERT checkpoint and save it.")
    parser.add_argument("--bert", required=True, help="Local folder or Hub id of a BERT-architecture checkpoint.")
    parser.add_argument(
        "--model_config",
        required=True,
        help=f"CMAL preset ({', '.join(CMAL_PRESETS)}) or path to a CMAL config JSON; used as given.",
    )
    parser.add_argument(
        "--head",
        choices=["pretraining", "model"],
        default="pretraining",
        help="`pretraining` builds CMALForPreTraining (BERT's MLM head fills `mapping_head.token_head`), `model` the bare CMALModel.",
    )
    parser.add_argument("--revision", default=None, help="Hub revision of `--bert` (branch, tag or commit).")
    parser.add_argument("--output_dir", required=True, help="Where `save_pretrained` writes the CMAL model.")
    args = parser.parse_args()

    if args.model_config in CMAL_PRESETS:
        config = CMALConfig.from_preset(args.model_config)
    else:
        config = CMALConfig.from_json_file(args.model_config)
    model = (CMALForPreTraining if args.head == "pretraining" else CMALModel)(config)
    report = load_bert_weights(model, args.bert, revision=args.revision)
    print(report)
    if not report.copied and not report.resized:
        raise SystemExit("Nothing was copied: does --model_config have the checkpoint's hidden size?")
    model.save_pretrained(args.output_dir)
    print(f"Saved to {args.output_dir}")


if __name__ == "__main__":
    main()
