"""The raw-image path: a tiny random RT-DETR turns pixel_values into regions inside the model."""

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors import safe_open
from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrResNetConfig

from cmal.modeling_cmal import (
    COCO_CONCEPT_NAMES,
    CMALConfig,
    CMALForQuestionAnswering,
    CMALForReferringExpression,
    CMALForVisualReasoning,
    CMALModel,
)
from cmal.processors.image_processing_cmal import CMALImageProcessor


LABELS = COCO_CONCEPT_NAMES[:10]


def tiny_detector_config(labels=LABELS) -> RTDetrConfig:
    backbone = RTDetrResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )  # fmt: skip
    return RTDetrConfig(
        backbone_config=backbone, encoder_in_channels=[32, 64, 128], encoder_hidden_dim=32, d_model=32,
        decoder_in_channels=[32, 32, 32], encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=20,
        decoder_layers=1, encoder_layers=1, decoder_attention_heads=2, encoder_attention_heads=2,
        decoder_n_points=2, anchor_image_size=None, use_pretrained_backbone=False,
        id2label=dict(enumerate(labels)),
    )  # fmt: skip


def cmal_config(**overrides) -> CMALConfig:
    values = dict(vocab_size=99, detector_num_regions=8, id2label={0: "yes", 1: "no", 2: "maybe"})
    return CMALConfig.from_detector(tiny_detector_config(), preset="tiny", **{**values, **overrides})


@pytest.fixture(scope="module")
def image_processor():
    return CMALImageProcessor(concept_names=LABELS, size={"height": 64, "width": 64})


@pytest.fixture(scope="module")
def photos():
    rng = np.random.default_rng(0)
    return [PIL.Image.fromarray(rng.integers(0, 255, (48 + 8 * i, 64, 3), dtype=np.uint8)) for i in range(3)]


def text_inputs(batch_size):
    input_ids = torch.tensor([[1, 11, 12, 13, 2]] * batch_size)
    return dict(input_ids=input_ids, token_concept_ids=torch.tensor([[-1, 3, -1, 5, -1]] * batch_size))


def test_config_follows_the_detector():
    config = cmal_config()
    assert config.visual_feat_dim == 32 and config.concept_names == LABELS
    assert config.detector_config["model_type"] == "rt_detr" and isinstance(config.detector_config, dict)


def test_image_in_logits_out_deterministic(image_processor, photos):
    torch.manual_seed(0)
    model = CMALForQuestionAnswering(cmal_config()).eval()
    pixels = image_processor(images=photos)["pixel_values"]
    first = model(**text_inputs(3), pixel_values=pixels).logits
    second = model(**text_inputs(3), pixel_values=pixels).logits
    assert first.shape == (3, 3) and torch.isfinite(first).all()
    assert torch.equal(first, second)


def test_image_alone_equals_image_in_batch(image_processor, photos):
    torch.manual_seed(0)
    model = CMALForQuestionAnswering(cmal_config()).eval()
    batch = model(**text_inputs(3), pixel_values=image_processor(images=photos)["pixel_values"]).logits
    for i, photo in enumerate(photos):
        alone = model(**text_inputs(1), pixel_values=image_processor(images=photo)["pixel_values"]).logits
        torch.testing.assert_close(alone[0], batch[i], atol=1e-5, rtol=1e-5)


def test_detected_regions_are_well_formed(image_processor, photos):
    model = CMALModel(cmal_config()).eval()
    regions = model.detect_regions(image_processor(images=photos)["pixel_values"])
    assert regions["visual_feats"].shape == (3, 8, 32) and regions["visual_pos"].shape == (3, 8, 7)
    scores = regions["region_scores"]
    assert (scores[:, :-1] >= scores[:, 1:]).all() and ((scores > 0) & (scores < 1)).all()  # top-K, descending
    boxes, pos = regions["visual_pos"][..., :4], regions["visual_pos"]
    assert ((boxes >= 0) & (boxes <= 1)).all() and (boxes[..., 2] >= boxes[..., 0]).all()
    torch.testing.assert_close(pos[..., 6], pos[..., 4] * pos[..., 5])
    assert ((regions["region_concept_ids"] >= 0) & (regions["region_concept_ids"] < 10)).all()
    out = model(**text_inputs(3), pixel_values=image_processor(images=photos)["pixel_values"])
    torch.testing.assert_close(out.region_boxes, boxes)
    assert torch.equal(out.region_concept_ids, regions["region_concept_ids"])


def test_labels_that_are_not_concepts_get_no_concept():
    detector = tiny_detector_config(labels=["dog", "unicorn", "cat"])
    config = CMALConfig.from_detector(detector, preset="tiny", concept_names=["cat", "dog"], vocab_size=99)
    model = CMALModel(config)
    assert model.detector.label_to_concept.tolist() == [1, -1, 0]


def test_detector_is_frozen_by_default(image_processor, photos):
    model = CMALForQuestionAnswering(cmal_config()).train()
    assert not model.cmal.detector.training and model.cmal.unified_encoder.training
    assert not any(p.requires_grad for p in model.cmal.detector.parameters())
    labels = torch.zeros(3, 3)
    labels[:, 0] = 1
    out = model(**text_inputs(3), pixel_values=image_processor(images=photos)["pixel_values"], labels=labels)
    out.loss.backward()
    assert all(p.grad is None for p in model.cmal.detector.parameters())
    assert model.cmal.visual_encoder.embeddings.feature_projection.weight.grad.abs().sum() > 0

    trainable = CMALForQuestionAnswering(cmal_config(train_detector=True)).train()
    assert trainable.cmal.detector.training
    trainable(**text_inputs(3), pixel_values=image_processor(images=photos)["pixel_values"], labels=labels).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.cmal.detector.parameters())


def test_detector_is_saved_in_the_same_checkpoint(tmp_path, image_processor, photos):
    torch.manual_seed(0)
    model = CMALForQuestionAnswering(cmal_config()).eval()
    pretrained_detector = RTDetrForObjectDetection(tiny_detector_config()).eval()
    model.load_detector_weights(pretrained_detector)
    for name, tensor in pretrained_detector.state_dict().items():
        assert torch.equal(model.cmal.detector.model.state_dict()[name], tensor), name
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert any(key.startswith("cmal.detector.model.") for key in f.keys())
    loaded = CMALForQuestionAnswering.from_pretrained(tmp_path).eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    pixels = image_processor(images=photos)["pixel_values"]
    assert torch.equal(loaded(**text_inputs(3), pixel_values=pixels).logits, model(**text_inputs(3), pixel_values=pixels).logits)


def test_referring_expression_returns_the_referred_box(image_processor, photos):
    model = CMALForReferringExpression(cmal_config()).eval()
    out = model(**text_inputs(3), pixel_values=image_processor(images=photos)["pixel_values"], labels=torch.tensor([0, 1, 2]))
    best = out.logits.argmax(-1)
    assert torch.equal(out.predicted_boxes, out.region_boxes[torch.arange(3), best])
    assert torch.isfinite(out.loss)


def test_visual_reasoning_from_two_raw_images(image_processor, photos):
    model = CMALForVisualReasoning(cmal_config()).eval()
    pixels = image_processor(images=photos[:2] + photos[1:])["pixel_values"].view(2, 2, 3, 64, 64)
    out = model(**text_inputs(2), pixel_values=pixels, labels=torch.tensor([0, 1]))
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)


def test_pixel_values_errors(image_processor, photos):
    pixels = image_processor(images=photos)["pixel_values"]
    with_detector = CMALModel(cmal_config()).eval()
    with pytest.raises(ValueError, match=r"Pass either `pixel_values` or precomputed regions, not both \(got \['visual_feats'\] too\)"):
        with_detector(**text_inputs(3), pixel_values=pixels, visual_feats=torch.zeros(3, 1, 32))
    with pytest.raises(ValueError, match=r"`pixel_values` must hold one image per text: batch_size 2, got 3"):
        with_detector(**text_inputs(2), pixel_values=pixels)
    with pytest.raises(ValueError, match=r"`pixel_values` must have shape \(batch_size, 3, height, width\), got \(3, 64, 64\)"):
        with_detector(**text_inputs(3), pixel_values=pixels[:, 0])
    with pytest.raises(ValueError, match=r"`pixel_values` must be finite"):
        with_detector(**text_inputs(3), pixel_values=pixels * float("nan"))
    odd = CMALImageProcessor(concept_names=LABELS, size={"height": 72, "width": 40})(images=photos[:1])["pixel_values"]
    with pytest.raises(ValueError, match=r"`pixel_values` are 72x40, but this detector reads sides that are multiples of 32 \(its "
                                         r"largest stride\): set the image processor's `size` to such a size, e.g. \{'height': 64, 'width': 32\}"):
        with_detector(**text_inputs(1), pixel_values=odd)
    without = CMALModel(CMALConfig.from_preset("tiny", vocab_size=99)).eval()
    with pytest.raises(ValueError, match=r"`pixel_values` need a detector, but this model has none"):
        without(**text_inputs(3), pixel_values=pixels)
    with pytest.raises(ValueError, match=r"`detector_num_regions` must be in \[1, max_regions=50\], got 60"):
        cmal_config(detector_num_regions=60)
