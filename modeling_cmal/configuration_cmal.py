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
"""CMAL model configuration.

The config keeps an explicit ``__init__`` (rather than the dataclass fields of the newest
transformers releases) because this file ships as Hub remote code and must load on every
transformers 5.x release: 5.0 builds configs through ``__init__``, later releases accept both.
"""

import math

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN


# The 80 COCO object categories: the tag vocabulary of the DETR-family detectors in transformers,
# hence the default concept vocabulary. Replace it with your detector's labels (e.g. the 1600
# Visual Genome classes of bottom-up-attention features) through `concept_names`.
COCO_CONCEPT_NAMES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]  # fmt: skip

# Named sizes. `tiny` is for tests, `mini` is the default pre-training run's (1,500 steps in about five
# minutes on 2 CPU cores; trained from scratch, so the hypersphere replaces the encoders' last LayerNorm),
# `small` pre-trains on a laptop CPU in tens of minutes, `base` matches BERT-base in width and, along the
# text path (text layers + unified layers), in depth.
CMAL_PRESETS = {
    "tiny": dict(
        hidden_size=32, num_attention_heads=4, intermediate_size=64,
        num_text_layers=1, num_visual_layers=1, num_hidden_layers=2,
        max_position_embeddings=128, max_regions=50,
    ),
    "mini": dict(
        hidden_size=128, num_attention_heads=4, intermediate_size=512,
        num_text_layers=1, num_visual_layers=1, num_hidden_layers=2,
        max_position_embeddings=512, max_regions=100, unimodal_final_layer_norm=False,
    ),
    "small": dict(
        hidden_size=256, num_attention_heads=4, intermediate_size=1024,
        num_text_layers=2, num_visual_layers=2, num_hidden_layers=4,
        max_position_embeddings=512, max_regions=100,
    ),
    "base": dict(
        hidden_size=768, num_attention_heads=12, intermediate_size=3072,
        num_text_layers=3, num_visual_layers=3, num_hidden_layers=9,
        max_position_embeddings=512, max_regions=100,
    ),
}  # fmt: skip


# field -> (type, lowest, highest, lowest excluded): what `CMALConfig` accepts, so a bad value fails here with
# its name, not deep inside torch (`hidden_size=0` would divide by zero, a negative size fail in `nn.Linear`).
_NUMBER_FIELDS = {
    "vocab_size": (int, 1, None, False), "hidden_size": (int, 1, None, False), "num_text_layers": (int, 0, None, False),
    "num_visual_layers": (int, 0, None, False), "num_hidden_layers": (int, 1, None, False),
    "num_attention_heads": (int, 1, None, False), "intermediate_size": (int, 1, None, False),
    "hidden_dropout_prob": (float, 0, 1, False), "attention_probs_dropout_prob": (float, 0, 1, False),
    "max_position_embeddings": (int, 1, None, False), "type_vocab_size": (int, 1, None, False),
    "initializer_range": (float, 0, None, False), "layer_norm_eps": (float, 0, None, True),
    "pad_token_id": (int, 0, None, False), "visual_feat_dim": (int, 1, None, False), "max_regions": (int, 1, None, False),
    "hypersphere_init_scale": (float, 0, None, True), "anchor_mask_prob": (float, 0, 1, False),
    "mlm_weight": (float, 0, None, False), "mrm_weight": (float, 0, None, False), "itm_weight": (float, 0, None, False),
    "amc_token_weight": (float, 0, None, False), "amc_region_weight": (float, 0, None, False),
    "amc_pointer_weight": (float, 0, None, False), "itc_weight": (float, 0, None, False),
    "itc_projection_dim": (int, 1, None, False), "itc_temperature": (float, 0.001, 0.5, False),
    "classifier_dropout": (float, 0, 1, False), "detector_num_regions": (int, 1, None, False),
    "detector_score_threshold": (float, 0, 1, False), "region_confidence_floor": (float, 0, 1, False),
}  # fmt: skip
_BOOL_FIELDS = ("hypersphere", "unimodal_final_layer_norm", "prompt_at_inference", "itm_hard_negatives", "train_detector",
                "tie_word_embeddings", "padding_free")  # fmt: skip


def _check_number(name: str, value, kind: type, low: float, high: float | None, low_excluded: bool) -> None:
    """`value` is a `kind` (an int is a float too; a bool is neither) in its range, else a ValueError naming `name`."""
    wanted = "an integer" if kind is int else "a number"
    if isinstance(value, bool) or not isinstance(value, (int,) if kind is int else (int, float)):
        raise ValueError(f"`{name}` must be {wanted}, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or value < low or (low_excluded and value == low) or (high is not None and value > high):
        interval = f"{'(' if low_excluded else '['}{low}, {'inf)' if high is None else f'{high}]'}"
        raise ValueError(f"`{name}` must be {wanted} in {interval}, got {value!r}")


class CMALConfig(PreTrainedConfig):
    r"""
    Configuration of a CMAL model (Cross-Modal Associative Learning, ACM MM 2022).

    Data flow: text and regions go through their own *uni-modal* encoders whose outputs lie on a
    hypersphere; the *associative prompt layer* swaps the features of anchor points (concepts that
    are both a region tag and a word) across modalities; a *unified* encoder runs over
    `[CLS] text [SEP] regions`. Every choice the paper leaves open is a field here.

    Args:
        vocab_size (`int`, defaults to 30522): size of the word-piece vocabulary (BERT-uncased).
        hidden_size (`int`, defaults to 768): width of every encoder.
        num_text_layers (`int`, defaults to 3): layers of the uni-modal text encoder (may be 0).
        num_visual_layers (`int`, defaults to 3): layers of the uni-modal region encoder (may be 0).
        num_hidden_layers (`int`, defaults to 9): layers of the unified cross-modal encoder.
        num_attention_heads (`int`, defaults to 12): heads in every attention layer.
        intermediate_size (`int`, defaults to 3072): width of the feed-forward layers.
        hidden_act (`str`, defaults to `"gelu"`): feed-forward activation.
        hidden_dropout_prob (`float`, defaults to 0.1): dropout on embeddings and layer outputs.
        attention_probs_dropout_prob (`float`, defaults to 0.1): dropout on attention weights.
        max_position_embeddings (`int`, defaults to 512): longest text, in word pieces.
        type_vocab_size (`int`, defaults to 2): BERT segment types of the text (kept for BERT init).
        initializer_range (`float`, defaults to 0.02): std of the normal weight init.
        layer_norm_eps (`float`, defaults to 1e-12): LayerNorm epsilon.
        pad_token_id (`int`, defaults to 0): id of `[PAD]`.
        visual_feat_dim (`int`, defaults to 2048): size of one region feature vector.
        visual_pos_dim (`int`, defaults to 7): size of one box vector; 7 = normalised
            `(x1, y1, x2, y2, w, h, area)`.
        max_regions (`int`, defaults to 100): most regions one image may have.
        concept_names (`list[str]`, *optional*): the detector's tag vocabulary; a concept id is an
            index into it. Defaults to the 80 COCO categories.
        num_concepts (`int`, *optional*): `len(concept_names)`; when given without names, names
            `concept_0 ...` are made up.
        hypersphere (`bool`, defaults to `True`): L2-normalise each uni-modal output per position
            and multiply it by a learnable per-modality scale, so that swapped features live in
            one space. `False` keeps plain features (an ablation).
        hypersphere_init_scale (`float`, *optional*): initial value of both scales; defaults to
            `sqrt(hidden_size)`, the norm of a LayerNorm output, so the sphere changes no magnitude.
        unimodal_final_layer_norm (`bool`, defaults to `True`): end each uni-modal encoder's last layer
            with its LayerNorm, as BERT does. A LayerNorm output already has a near-constant norm, so after
            it the hypersphere only rescales (measured: per-position norms within 1% of each other).
            `False` drops that LayerNorm: the hypersphere (or, without it, nothing) is then what bounds the
            uni-modal features (measured after pre-training: norms vary by 12% (text) and 25% (regions)
            before the sphere). The `mini` preset uses `False`; `True` keeps BERT's layout and earlier
            checkpoints as they were.
        anchor_mask_prob (`float`, defaults to 0.3): in training, the probability that one anchor
            concept of an example is masked and swap-filled.
        prompt_at_inference (`bool`, defaults to `False`): in evaluation, swap every anchor
            (`True`) or none (`False`).
        anchor_fill (`str`, defaults to `"swap"`): what a chosen anchor slot receives: `"swap"`, the
            partner feature of the other modality (CMAL); `"mask"`, nothing (a zero feature, so only
            the prompt type embedding marks the slot): plain anchor masking, an ablation.
        mlm_weight, mrm_weight, itm_weight (`float`, default 1.0): weights of masked language
            modelling, masked region modelling (feature regression + concept classification) and
            image-text matching in `CMALForPreTraining`; 0 switches a loss off.
        amc_token_weight, amc_region_weight, amc_pointer_weight (`float`, default 1.0): weights of
            the three parts of associative mapping classification: a swapped token predicts its
            word, a swapped region its concept, a swapped token its partner region.
        itc_weight (`float`, defaults to 0.0): weight of the image-text contrastive loss between
            the uni-modal vectors (the paper's CMCL baseline, built as ALBEF/CLIP build it); off by default.
        itc_projection_dim (`int`, defaults to 256): size of the ITC projections of the text `[CLS]` and
            the mean region feature.
        itc_temperature (`float`, defaults to 0.07): initial softmax temperature of the ITC loss; it is
            learnt, clamped to [0.001, 0.5] (ALBEF).
        itm_hard_negatives (`bool`, defaults to `True`): with ITC and ITM on, add ALBEF's hard negatives to
            ITM: for every true pair in the batch, an image drawn for its text and a text drawn for its image,
            each in proportion to the ITC similarity (other images only). Costs one more forward pass over
            twice the true pairs.
        classifier_dropout (`float`, *optional*): dropout before task heads; defaults to
            `hidden_dropout_prob`.
        detector_config (`dict` or `PreTrainedConfig`, *optional*): config of a transformers
            object-detection model (RT-DETR by default, see `CMALConfig.from_detector`) that turns
            `pixel_values` into regions: the raw-image path. `None` means regions come precomputed.
            Stored as a plain dict so the checkpoint loads on any transformers 5.x.
        detector_num_regions (`int`, defaults to 36): regions kept per image, the top ones by score.
        detector_score_threshold (`float`, defaults to 0.0): kept regions scoring below it are masked.
        train_detector (`bool`, defaults to `False`): fine-tune the detector too; by default it is
            frozen (no gradients, always in eval mode).
        region_confidence_floor (`float`, *optional*): an image whose best region scores below it is unlike
            the images the checkpoint was trained on (the VQA pipeline's `weak_detections`). Fine-tuning sets
            it to the 5th percentile of its training images' best region scores; `None`: 0.5.
        tie_word_embeddings (`bool`, defaults to `True`): tie the vocabulary head to the word
            embeddings.
        padding_free (`bool`, defaults to `False`): run every encoder layer on the real tokens and
            regions only, packed into one sequence: no projection, feed-forward or LayerNorm is computed
            on padding. Attention gets the packed sequence with its boundaries (`cu_seq_lens_*`) under a
            flash-attention implementation (variable-length kernels); under eager and sdpa it gets the
            batch re-padded, so only its small share of the work still sees padding. Outputs equal the
            padded path within float tolerance (padded slots come out as zeros). Pays on batches with
            much padding (pre-training's adaptive region counts); off, the graph has no data-dependent
            shapes (`torch.compile`, export). Not used when `output_attentions`/`output_hidden_states`
            are asked for.

    Example:

    ```python
    >>> from modeling_cmal import CMALConfig, CMALModel
    >>> config = CMALConfig.from_preset("tiny")
    >>> model = CMALModel(config)
    ```
    """

    model_type = "cmal"

    def __init__(
        self,
        vocab_size: int = 30522,
        hidden_size: int = 768,
        num_text_layers: int = 3,
        num_visual_layers: int = 3,
        num_hidden_layers: int = 9,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        pad_token_id: int = 0,
        visual_feat_dim: int = 2048,
        visual_pos_dim: int = 7,
        max_regions: int = 100,
        concept_names: list[str] | None = None,
        num_concepts: int | None = None,
        hypersphere: bool = True,
        hypersphere_init_scale: float | None = None,
        unimodal_final_layer_norm: bool = True,
        anchor_mask_prob: float = 0.3,
        prompt_at_inference: bool = False,
        anchor_fill: str = "swap",
        mlm_weight: float = 1.0,
        mrm_weight: float = 1.0,
        itm_weight: float = 1.0,
        amc_token_weight: float = 1.0,
        amc_region_weight: float = 1.0,
        amc_pointer_weight: float = 1.0,
        itc_weight: float = 0.0,
        itc_projection_dim: int = 256,
        itc_temperature: float = 0.07,
        itm_hard_negatives: bool = True,
        classifier_dropout: float | None = None,
        detector_config: dict | None = None,
        detector_num_regions: int = 36,
        detector_score_threshold: float = 0.0,
        train_detector: bool = False,
        region_confidence_floor: float | None = None,
        tie_word_embeddings: bool = True,
        padding_free: bool = False,
        **kwargs,
    ):
        if isinstance(concept_names, str) or (concept_names is not None and not all(
            isinstance(name, str) and name.strip() for name in concept_names
        )):  # fmt: skip
            raise ValueError(f"`concept_names` must be a list of non-empty names, got {concept_names!r}"[:300])
        if concept_names is None:
            concept_names = (
                list(COCO_CONCEPT_NAMES)
                if num_concepts is None
                else [f"concept_{i}" for i in range(num_concepts)]
            )
        concept_names = list(concept_names)
        if num_concepts is not None and num_concepts != len(concept_names):
            raise ValueError(
                f"`num_concepts` ({num_concepts}) must equal len(`concept_names`) ({len(concept_names)})"
            )
        if len(set(concept_names)) != len(concept_names):
            raise ValueError("`concept_names` must not repeat a name")
        for name, (kind, low, high, low_excluded) in _NUMBER_FIELDS.items():
            value = locals()[name]
            if value is not None or name not in ("hypersphere_init_scale", "classifier_dropout", "region_confidence_floor"):
                _check_number(name, value, kind, low, high, low_excluded)
        for name in _BOOL_FIELDS:
            if not isinstance(locals()[name], bool):
                raise ValueError(f"`{name}` must be true or false, got {locals()[name]!r}")
        if pad_token_id >= vocab_size:
            raise ValueError(f"`pad_token_id` ({pad_token_id}) must be below `vocab_size` ({vocab_size})")
        if hidden_act not in ACT2FN:
            raise ValueError(f"`hidden_act` must be one of {sorted(ACT2FN)}, got {hidden_act!r}")
        if visual_pos_dim not in (4, 6, 7):
            raise ValueError(f"`visual_pos_dim` must be 4, 6 or 7 (x1, y1, x2, y2[, w, h[, area]]), got {visual_pos_dim!r}")
        if hidden_size % num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({hidden_size}) must be a multiple of `num_attention_heads` ({num_attention_heads})"
            )

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_text_layers = num_text_layers
        self.num_visual_layers = num_visual_layers
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.pad_token_id = pad_token_id
        self.visual_feat_dim = visual_feat_dim
        self.visual_pos_dim = visual_pos_dim
        self.max_regions = max_regions
        self.concept_names = concept_names
        self.num_concepts = len(concept_names)
        self.hypersphere = hypersphere
        self.hypersphere_init_scale = (
            math.sqrt(hidden_size) if hypersphere_init_scale is None else hypersphere_init_scale
        )
        self.unimodal_final_layer_norm = unimodal_final_layer_norm
        self.anchor_mask_prob = anchor_mask_prob
        self.prompt_at_inference = prompt_at_inference
        if anchor_fill not in ("swap", "mask"):
            raise ValueError(f"`anchor_fill` must be 'swap' or 'mask', got {anchor_fill!r}")
        self.anchor_fill = anchor_fill
        self.mlm_weight = mlm_weight
        self.mrm_weight = mrm_weight
        self.itm_weight = itm_weight
        self.amc_token_weight = amc_token_weight
        self.amc_region_weight = amc_region_weight
        self.amc_pointer_weight = amc_pointer_weight
        self.itc_weight = itc_weight
        self.itc_projection_dim = itc_projection_dim
        self.itc_temperature = itc_temperature
        self.itm_hard_negatives = itm_hard_negatives
        self.classifier_dropout = classifier_dropout
        if detector_config is not None and not isinstance(detector_config, dict):
            detector_config = detector_config.to_dict()
        if detector_config is not None and "model_type" not in detector_config:
            raise ValueError("`detector_config` must name its `model_type` (e.g. 'rt_detr'), got keys without it")
        if not 0 < detector_num_regions <= max_regions:
            raise ValueError(
                f"`detector_num_regions` must be in [1, max_regions={max_regions}], got {detector_num_regions}"
            )
        self.detector_config = detector_config
        self.detector_num_regions = detector_num_regions
        self.detector_score_threshold = detector_score_threshold
        self.train_detector = train_detector
        self.region_confidence_floor = region_confidence_floor
        self.tie_word_embeddings = tie_word_embeddings
        self.padding_free = padding_free
        if kwargs.get("id2label") is not None and kwargs.get("label2id") is None:
            # transformers 5 no longer derives it; pipelines and label lookups need both directions
            kwargs["label2id"] = {label: int(i) for i, label in kwargs["id2label"].items()}
        super().__init__(**kwargs)
        self._check_labels()

    @classmethod
    def _dict_from_json_file(cls, json_file):
        """A config file must hold a JSON object: a list or a string would fail later as a bare TypeError."""
        config_dict = super()._dict_from_json_file(json_file)
        if not isinstance(config_dict, dict):
            raise ValueError(f"{json_file} must hold a JSON object of config fields, got a {type(config_dict).__name__}")
        return config_dict

    def _check_labels(self) -> None:
        """`id2label` numbers 0..n-1 with distinct labels and `label2id` is its inverse: a head's class i must mean
        one thing in both directions (a pipeline reads one, training the other)."""
        id2label, label2id = self.id2label or {}, self.label2id or {}
        if sorted(int(i) for i in id2label) != list(range(len(id2label))):
            raise ValueError(f"`id2label` must number its labels 0..{len(id2label) - 1}, got ids {sorted(id2label)[:10]}")
        if len(set(id2label.values())) != len(id2label):
            raise ValueError("`id2label` must not repeat a label")
        inverse = {label: int(i) for i, label in id2label.items()}
        if label2id and {label: int(i) for label, i in label2id.items()} != inverse:
            wrong = sorted(label for label in set(label2id) | set(inverse) if label2id.get(label) != inverse.get(label))
            raise ValueError(f"`label2id` must be the inverse of `id2label`; they disagree on {wrong[:5]}")

    @classmethod
    def from_detector(cls, detector_config, preset: str = "base", **kwargs) -> "CMALConfig":
        """A config whose raw-image path runs this detector (a transformers object-detection config).

        The region feature size becomes the detector's query size and the concepts its label names,
        so tags, features and the processor's lexicon agree with what the detector predicts.
        """
        names = [detector_config.id2label[i] for i in range(detector_config.num_labels)]
        feature_dim = getattr(detector_config, "d_model", None) or detector_config.hidden_size
        fields = dict(detector_config=detector_config, visual_feat_dim=feature_dim, concept_names=names)
        return cls.from_preset(preset, **{**fields, **kwargs})

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "CMALConfig":
        """Build a config from a named size (`tiny`, `small`, `base`); `kwargs` override fields."""
        if name not in CMAL_PRESETS:
            raise ValueError(f"`name` must be one of {sorted(CMAL_PRESETS)}, got {name!r}")
        return cls(**{**CMAL_PRESETS[name], **kwargs})


__all__ = ["CMALConfig", "CMAL_PRESETS", "COCO_CONCEPT_NAMES"]
