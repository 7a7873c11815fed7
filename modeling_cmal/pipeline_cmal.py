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
"""CMAL's pipelines, one per fine-tuned head, shipped as Hub remote code beside `modeling_cmal.py`.

A fine-tuned checkpoint names its pipeline in `config.custom_pipelines`, so

    vqa = pipeline("visual-question-answering", model=folder_or_hub_id, trust_remote_code=True)
    vqa(image="photo.jpg", question="what is the cat sitting on?")        # checkpoints with a detector
    vqa(regions=regions, question="what colour is the ball?")            # precomputed regions

returns `[{"score", "answer", "unknown_words", "weak_detections"}]`. transformers 5 dropped its own VQA pipeline for generative models;
a custom pipeline is how region classifiers answer through `pipeline()`. `regions` is one image's
region dict as `CMALImageProcessor` takes it (features, boxes, tags or concept_ids, scores);
`image` is a path, URL or PIL image and needs a checkpoint whose config has a `detector_config`.

The other heads: "visual-entailment" (`hypothesis`) gives every label with its probability,
"referring-expression" (`expression`) the referred region's box, "visual-reasoning" (`images` =
[left, right], `sentence`) true/false with probabilities, and "image-text-retrieval" ranks `images`
for a `text`, or `texts` for an `image`.
"""

import warnings

import torch
from transformers import Pipeline

from .configuration_cmal import _check_number


class CMALPipeline(Pipeline):
    """Shared by the CMAL pipelines: a text plus an image (raw, through the checkpoint's detector) or
    precomputed regions becomes the processor's inputs; the head's outputs become plain Python values."""

    _load_processor = True
    _load_image_processor = False
    _load_tokenizer = False
    _load_feature_extractor = False
    text_argument = "text"

    def __call__(self, inputs=None, **kwargs):
        """`pipe(image=..., <text argument>=...)`, `pipe(regions=..., ...)`, or a dict (or list of dicts) of those keys."""
        if inputs is None:
            keys = ("image", "regions", "images", "texts", self.text_argument)
            inputs = {key: kwargs.pop(key) for key in keys if key in kwargs}
        if isinstance(inputs, list) and not all(isinstance(item, dict) for item in inputs):
            wrong = next(i for i, item in enumerate(inputs) if not isinstance(item, dict))
            raise ValueError(f"`inputs[{wrong}]` must be a dict of this pipeline's keys (image or regions, and "
                             f"{self.text_argument}), got {type(inputs[wrong]).__name__}")  # fmt: skip
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(self, top_k=None, timeout=None, max_length=None, **kwargs):
        if top_k is not None:
            _check_number("top_k", top_k, int, 1, None, False)
        preprocess = {key: value for key, value in (("timeout", timeout), ("max_length", max_length)) if value is not None}
        return preprocess, {}, {} if top_k is None else {"top_k": top_k}

    def _visual(self, image, regions, timeout=None):
        """The processor's visual argument for one image: `regions=[dict]` or `images=[PIL image]`."""
        if regions is not None or isinstance(image, dict):
            return {"regions": [regions if regions is not None else image]}
        if image is None:
            raise ValueError("Pass `image` (a path, URL or PIL image) or `regions` (a dict of precomputed regions)")
        if getattr(self.model.config, "detector_config", None) is None:
            raise ValueError(
                "This checkpoint has no detector, so it cannot read raw images: pass `regions=` (precomputed "
                "regions, e.g. from training/extract_regions.py) instead of `image=`"
            )
        return {"images": [self.processor.image_processor.open_image(image, timeout=timeout)]}

    def _text(self, inputs: dict, max_length: int) -> str:
        """The text argument, checked; a text longer than `max_length` word pieces is read up to there, with a
        warning (a question pasted by a user must not fail on the position embeddings)."""
        text = inputs.get(self.text_argument)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"`{self.text_argument}` must be a non-empty string, got {text!r}")
        pieces = len(self.processor.tokenizer(text)["input_ids"])
        if pieces > max_length:
            warnings.warn(f"`{self.text_argument}` has {pieces} word pieces; only the first {max_length} are read", UserWarning)
        return text

    def _max_length(self, max_length: int | None) -> int:
        """`max_length`, else the tokenizer's or the model's limit, whichever is lower."""
        return max_length or min(self.processor.tokenizer.model_max_length, self.model.config.max_position_embeddings)

    def preprocess(self, inputs, timeout=None, max_length=None):
        visual = self._visual(inputs.get("image"), inputs.get("regions"), timeout)
        max_length = self._max_length(max_length)
        return self.processor(text=self._text(inputs, max_length), max_length=max_length, **visual)

    def _forward(self, model_inputs):
        return self.model(**model_inputs)

    def _labelled_probabilities(self, probabilities: torch.Tensor, top_k: int | None, key: str) -> list[dict]:
        top_k = len(probabilities) if top_k is None else min(top_k, len(probabilities))
        scores, ids = probabilities.float().topk(top_k)
        return [{"score": s, key: self.model.config.id2label[i]} for s, i in zip(scores.tolist(), ids.tolist())]


class CMALVisualQuestionAnsweringPipeline(CMALPipeline):
    """`[{"score", "answer", "unknown_words", "weak_detections"}]`, best first: each answer's sigmoid score (the
    head is trained with BCE), and two facts about the question and image that say how far to trust it, the same
    in every answer's dict:

    - `unknown_words`: the question's words the checkpoint's tokenizer reads as its unknown token, so the model
      never saw them (a word-level vocabulary of a closed world reads "what is on the table?" as "what is on the
      [UNK]?");
    - `weak_detections`: True when no region of the image scores at least `confident_score`, by default the
      checkpoint's `config.region_confidence_floor` (set by fine-tuning: the 5th percentile of its training
      images' best region score; 0.5 when unset). A detector finds the concepts it was trained on
      (`config.concept_names`) confidently in images like its training images; an image whose best region
      scores below what 19 in 20 of those reach is unlike them, and the answer, however high its own score,
      is a guess. Regions given without scores count as confident (the processor scores them 1).
    """

    text_argument = "question"

    def _sanitize_parameters(self, top_k=None, timeout=None, max_length=None, confident_score=None, **kwargs):
        preprocess, forward, postprocess = super()._sanitize_parameters(top_k, timeout, max_length, **kwargs)
        if confident_score is not None:
            _check_number("confident_score", confident_score, float, 0, 1, False)
            forward["confident_score"] = float(confident_score)
        return preprocess, forward, postprocess

    def unknown_words(self, text: str) -> list[str]:
        """The words of `text` the tokenizer maps to its unknown token, in order, each once."""
        tokenizer = self.processor.tokenizer
        if tokenizer.unk_token_id is None:
            return []
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = zip(encoded["input_ids"], encoded["offset_mapping"])
        return list(dict.fromkeys(text[start:end] for token, (start, end) in spans if token == tokenizer.unk_token_id))

    def preprocess(self, inputs, timeout=None, max_length=None):
        model_inputs = super().preprocess(inputs, timeout, max_length)
        return {"model_inputs": model_inputs, "unknown_words": self.unknown_words(inputs["question"])}

    def _forward(self, inputs, confident_score=None):
        """Detects first (when given pixels), so the region scores behind `weak_detections` are at hand."""
        if confident_score is None:
            floor = self.model.config.region_confidence_floor
            confident_score = 0.5 if floor is None else floor
        model_inputs = dict(inputs["model_inputs"])
        if "pixel_values" in model_inputs:
            model_inputs.update(self.model.base_model.detect_regions(model_inputs.pop("pixel_values")))
        confident = model_inputs["visual_attention_mask"].bool() & (model_inputs["region_scores"] >= confident_score)
        return {"logits": self.model(**model_inputs).logits, "unknown_words": inputs["unknown_words"],
                "weak_detections": not bool(confident.any())}  # fmt: skip

    def postprocess(self, model_outputs, top_k=5):
        answers = self._labelled_probabilities(model_outputs["logits"][0].sigmoid(), top_k, "answer")
        facts = {"unknown_words": model_outputs["unknown_words"], "weak_detections": model_outputs["weak_detections"]}
        return [{**answer, **facts} for answer in answers]


class CMALVisualEntailmentPipeline(CMALPipeline):
    """`[{"score", "label"}]` for every label (entailment / neutral / contradiction), best first."""

    text_argument = "hypothesis"

    def postprocess(self, model_outputs, top_k=None):
        return self._labelled_probabilities(model_outputs.logits[0].softmax(-1), top_k, "label")


class CMALVisualReasoningPipeline(CMALPipeline):
    """NLVR2: `images=[left, right]` (raw or region dicts) and a `sentence` -> `[{"score", "label"}]`."""

    text_argument = "sentence"

    def preprocess(self, inputs, timeout=None, max_length=None):
        images = inputs.get("images")
        if not isinstance(images, (list, tuple)) or len(images) != 2:
            raise ValueError(f"`images` must be the two images [left, right] of NLVR2, got {type(images).__name__}")
        visual = [self._visual(image, None, timeout) for image in images]
        key = next(iter(visual[0]))
        if any(next(iter(v)) != key for v in visual):
            raise ValueError("`images` must both be raw images or both be region dicts")
        max_length = self._max_length(max_length)
        text = self._text(inputs, max_length)
        batch = self.processor(text=[text, text], max_length=max_length, **{key: [v[key][0] for v in visual]})
        names = set(self.processor.image_processor.model_input_names)
        return {k: v.unsqueeze(0) if k in names else v[:1] for k, v in batch.items()}

    def postprocess(self, model_outputs, top_k=None):
        return self._labelled_probabilities(model_outputs.logits[0].softmax(-1), top_k, "label")


class CMALReferringExpressionPipeline(CMALPipeline):
    """`{"box", "score", "region_index"}`: the referred region, its box as normalised (x1, y1, x2, y2)
    and its probability among the regions; with `top_k`, a list of the best `top_k` regions."""

    text_argument = "expression"

    def postprocess(self, model_outputs, top_k=None):
        probabilities = model_outputs.logits[0].float().softmax(-1)
        scores, ids = probabilities.topk(1 if top_k is None else min(top_k, len(probabilities)))
        boxes = model_outputs.region_boxes[0]
        found = [{"box": boxes[i].tolist(), "score": s, "region_index": i} for s, i in zip(scores.tolist(), ids.tolist())]
        return found[0] if top_k is None else found


class CMALImageTextRetrievalPipeline(CMALPipeline):
    """Ranks candidates by the ITM score: `text` + `images` (raw or region dicts) ranks the images,
    `image` (or `regions`) + `texts` ranks the texts; `[{"index", "score"}]`, best first."""

    def preprocess(self, inputs, timeout=None, max_length=None):
        max_length = self._max_length(max_length)
        if inputs.get("images") is not None:
            text, candidates = self._text(inputs, max_length), list(inputs["images"])
            visual = [self._visual(image, None, timeout) for image in candidates]
            key = next(iter(visual[0]))
            return self.processor(text=[text] * len(candidates), max_length=max_length, **{key: [v[key][0] for v in visual]})
        texts = inputs.get("texts")
        if not isinstance(texts, (list, tuple)) or not texts:
            raise ValueError("Pass `text` with `images` (rank images) or `image`/`regions` with `texts` (rank texts)")
        key, value = next(iter(self._visual(inputs.get("image"), inputs.get("regions"), timeout).items()))
        return self.processor(text=list(texts), max_length=max_length, **{key: value * len(texts)})

    def postprocess(self, model_outputs, top_k=None):
        scores = model_outputs.scores.float()
        values, order = scores.topk(len(scores) if top_k is None else min(top_k, len(scores)))
        return [{"index": i, "score": s} for s, i in zip(values.tolist(), order.tolist())]


# task name -> pipeline class; each head names its task in `CMAL_PIPELINE_TASKS` of modeling_cmal.py
PIPELINES = {
    "visual-question-answering": CMALVisualQuestionAnsweringPipeline,
    "visual-entailment": CMALVisualEntailmentPipeline,
    "visual-reasoning": CMALVisualReasoningPipeline,
    "referring-expression": CMALReferringExpressionPipeline,
    "image-text-retrieval": CMALImageTextRetrievalPipeline,
}

__all__ = ["CMALPipeline", *(cls.__name__ for cls in PIPELINES.values()), "PIPELINES"]
