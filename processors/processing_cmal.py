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
"""The paired CMAL processor: tokenizer + anchor lexicon + image-region processor, one call.

Ships as Hub remote code next to `image_processing_cmal.py` and `anchor_lexicon.py`, which it
imports relatively.
"""

import numpy as np
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .anchor_lexicon import AnchorLexicon
from .image_processing_cmal import CMALImageProcessor  # noqa: F401  (a relative import: the Hub copies the file with this one)


class CMALProcessor(ProcessorMixin):
    r"""
    Turns text plus images (raw or as precomputed regions) into every input a CMAL model takes.

    `processor(text=..., images=...)` gives `pixel_values` for a model with a detector;
    `processor(text=..., regions=...)` gives the padded region inputs. Either way the text is
    tokenised (any fast BERT-style tokenizer) and each word piece gets its concept id from the anchor
    lexicon (`token_concept_ids`, -1 for none), so the model can find anchor points.

    Args:
        image_processor (`CMALImageProcessor`): regions and raw images.
        tokenizer (`PreTrainedTokenizerFast`): a fast tokenizer (offsets and word ids are needed).
        anchor_lexicon (`dict`, *optional*): `AnchorLexicon.to_dict()`; defaults to the lexicon built
            from the image processor's `concept_names`. Saved in `processor_config.json`.
    """

    def __init__(self, image_processor=None, tokenizer=None, anchor_lexicon: dict | None = None, **kwargs):
        if image_processor is None or tokenizer is None:
            raise ValueError("CMALProcessor needs both an `image_processor` and a `tokenizer`")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"`tokenizer` must be a fast tokenizer (word offsets are needed), got {type(tokenizer).__name__}"
            )
        concept_names = image_processor.concept_names
        if anchor_lexicon is None:
            if concept_names is None:
                raise ValueError("`image_processor.concept_names` is None: pass `anchor_lexicon` or the concept names")
            anchor_lexicon = AnchorLexicon(concept_names).to_dict()
        self.lexicon = AnchorLexicon.from_dict(anchor_lexicon)
        if concept_names is not None and list(self.lexicon.concept_names) != list(concept_names):
            raise ValueError("`anchor_lexicon` concept names differ from `image_processor.concept_names`")
        self.anchor_lexicon = self.lexicon.to_dict()
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(
        self,
        images=None,
        text=None,
        regions=None,
        padding: bool | str = True,
        truncation: bool = True,
        max_length: int | None = None,
        return_tensors: str | None = "pt",
        return_word_ids: bool = False,
        **kwargs,
    ) -> BatchFeature:
        """Tokenise `text` (a string or a list), label anchors, and process `images` or `regions`.

        One text per image: `len(text)` must equal the number of images or region dicts.
        `return_word_ids=True` adds `word_ids` (the word index of each token, -1 for special and
        padding tokens), which whole-word masking needs; it is not a model input.
        """
        texts = _texts(text)
        if (images is None) == (regions is None):
            raise ValueError("Pass exactly one of `images` (raw images) or `regions` (precomputed detections)")

        data = self._encode(texts, return_word_ids, padding=padding, truncation=truncation, max_length=max_length, **kwargs)
        text_features = BatchFeature(data=data, tensor_type=return_tensors)

        visual = self.image_processor(images=images, regions=regions, return_tensors=return_tensors)
        num_images = len(next(iter(visual.values())))
        if num_images != len(texts):
            raise ValueError(f"One text per image: got {len(texts)} texts and {num_images} images or region sets")
        return BatchFeature(data={**text_features, **visual}, tensor_type=return_tensors)

    def encode_texts(self, text, max_length: int | None = None) -> dict[str, list[list[int]]]:
        """The text side of `__call__(text=..., max_length=...)` for each text, unpadded: the tokenizer's ids (cut to
        `max_length`), `token_concept_ids` and `word_ids` (-1 for special tokens), one list per text.

        A training corpus reads each caption once an epoch: encoded once (`datasets.map`) and padded per batch
        (`pad_texts`), its epochs skip the tokenizer and the anchor lexicon."""
        return self._encode(_texts(text), True, truncation=True, max_length=max_length)

    def _encode(self, texts: list[str], word_ids: bool, **tokenizer_kwargs) -> dict[str, list[list[int]]]:
        """The tokenizer's output for `texts` (offsets left out), each token's anchor concept id and, with `word_ids`,
        each token's word index (-1 for special and padding tokens)."""
        encoding = self.tokenizer(texts, return_offsets_mapping=True, **tokenizer_kwargs)
        words = [encoding.word_ids(i) for i in range(len(texts))]
        encoded = {key: value for key, value in encoding.items() if key != "offset_mapping"}
        encoded["token_concept_ids"] = [self.lexicon.token_concept_ids(text, offsets, ids)
                                        for text, offsets, ids in zip(texts, encoding["offset_mapping"], words)]  # fmt: skip
        if word_ids:
            encoded["word_ids"] = [[-1 if w is None else w for w in ids] for ids in words]
        return encoded

    def pad_texts(self, rows: list[dict], return_word_ids: bool = False) -> dict:
        """`encode_texts` rows (one dict of arrays or lists per text) padded to the longest as `__call__` pads them
        (`padding=True`, on the tokenizer's `padding_side`, with its pad ids; -1 for concepts and word ids): int64
        numpy arrays, `word_ids` only when asked for."""
        pad_values = {"input_ids": self.tokenizer.pad_token_id, "attention_mask": 0, "token_type_ids": self.tokenizer.pad_token_type_id,
                      "token_concept_ids": -1, "word_ids": -1}  # fmt: skip
        if not rows:
            raise ValueError("`rows` is empty: pass one encoded text per image")
        unknown = sorted(set(rows[0]) - set(pad_values))
        if unknown or "input_ids" not in rows[0]:
            raise ValueError(f"`rows` must hold `encode_texts` keys ({sorted(pad_values)}), got {sorted(rows[0])}")
        lengths = [len(row["input_ids"]) for row in rows]
        longest, left = max(lengths), self.tokenizer.padding_side == "left"
        batch = {}
        for key in rows[0]:
            if key == "word_ids" and not return_word_ids:
                continue
            padded = np.full((len(rows), longest), pad_values[key], dtype=np.int64)
            for b, (row, length) in enumerate(zip(rows, lengths)):
                values = row.get(key, ())
                if len(values) != length:
                    raise ValueError(f"`rows[{b}]['{key}']` must have the length of its `input_ids` ({length}), got {len(values)}")
                if left:
                    padded[b, longest - length :] = values
                else:
                    padded[b, :length] = values
            batch[key] = padded
        return batch

    @property
    def model_input_names(self):
        names = list(self.tokenizer.model_input_names) + ["token_concept_ids"]
        return names + [name for name in self.image_processor.model_input_names if name not in names]


def _texts(text) -> list[str]:
    """`text` as a non-empty list of texts that hold a word each, or a `ValueError` naming the one that does not."""
    if text is None:
        raise ValueError("`text` is required: CMAL reads an image together with a text")
    texts = [text] if isinstance(text, str) else list(text)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"`text` must be a string or a non-empty list of strings, got {type(text).__name__}")
    blank = [i for i, t in enumerate(texts) if not t.strip()]
    if blank:  # it would be read as `[CLS] [SEP]`: an answer to no question
        raise ValueError(f"`text[{blank[0]}]` is blank ({texts[blank[0]]!r}): every text must hold at least one word")
    return texts


CMALProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["CMALProcessor"]
