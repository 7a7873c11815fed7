"""A model trained from scratch (its config from a preset or a JSON fitted to the tokenizer and the region store, its
processor) and the flags that change how any model computes (`--gradient_checkpointing`, `--padding_free`)."""

import difflib
import inspect
import json

from cmal.modeling_cmal import CMAL_PRESETS, CMALConfig
from cmal.processors import AnchorLexicon, CMALImageProcessor, CMALProcessor


def config_from_file(path: str) -> CMALConfig:
    """A `--model_config` JSON file; a field CMALConfig does not know is refused (transformers would keep it as
    an attribute nobody reads, and train the defaults), with the nearest known names."""
    try:
        with open(path) as f:
            fields = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--model_config {path}: not a JSON file ({error})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"--model_config {path}: expected a JSON object of config fields, got {type(fields).__name__}")
    known = set(CMALConfig().to_dict()) | {"auto_map", "custom_pipelines"}  # the last two: what save_pretrained adds
    unknown = sorted(set(fields) - known)
    if unknown:
        near = {name: difflib.get_close_matches(name, known, n=1) for name in unknown}
        hints = ", ".join(f"{name!r}" + (f" (did you mean {near[name][0]!r}?)" if near[name] else "") for name in unknown)
        raise ValueError(f"--model_config {path}: unknown config fields {hints}; CMALConfig's fields: "
                         f"{', '.join(sorted(inspect.signature(CMALConfig.__init__).parameters.keys() - {'self', 'kwargs'}))}")  # fmt: skip
    return CMALConfig.from_dict(fields)


def new_model_config(model_config: str, tokenizer, metadata: dict, **overrides) -> CMALConfig:
    """A preset name or config JSON, fitted to the tokenizer and the region store: a model trained from scratch."""
    base = CMALConfig.from_preset(model_config) if model_config in CMAL_PRESETS else config_from_file(model_config)
    return CMALConfig.from_dict({
        **base.to_dict(), "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
        "visual_feat_dim": metadata["feature_dim"], "concept_names": list(metadata["concept_names"]), "num_concepts": None,
        **overrides,
    })  # fmt: skip


def new_processor(config: CMALConfig, tokenizer, lexicon: AnchorLexicon | None = None, detector: str | None = None) -> CMALProcessor:
    """The processor of a new model: its concepts and region limits, the tokenizer, and the anchor lexicon
    (default: the concept names themselves); with a `detector` folder, that detector's own image preprocessing."""
    limits = dict(concept_names=config.concept_names, max_regions=config.max_regions, visual_pos_dim=config.visual_pos_dim)
    if detector is None:
        image_processor = CMALImageProcessor(**limits)
    else:
        from transformers import AutoImageProcessor

        image_processor = CMALImageProcessor.from_detector_processor(AutoImageProcessor.from_pretrained(detector), **limits)
    lexicon = lexicon or AnchorLexicon(config.concept_names)
    return CMALProcessor(image_processor, tokenizer, anchor_lexicon=lexicon.to_dict())


def enable_activation_checkpointing(model) -> None:
    """Recompute activations in the backward pass. transformers renamed `gradient_checkpointing_enable` to
    `activation_checkpointing_enable` (the old name now warns); 5.0, our lower bound, has only the old one."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def apply_compute_flags(model, gradient_checkpointing: bool, padding_free: bool) -> None:
    """`--gradient_checkpointing` and `--padding_free`: how the model computes, not what (both scripts)."""
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
    if padding_free:
        model.config.padding_free = True  # saved with the model: its users' padded batches run packed too
