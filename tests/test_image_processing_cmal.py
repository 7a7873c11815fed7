"""CMALImageProcessor: precomputed regions and raw images of every common kind."""

import io

import numpy as np
import PIL.Image
import pytest
import torch

from cmal.processors.image_processing_cmal import CMALImageProcessor


NAMES = ["dog", "cat", "person", "traffic light"]
SIZE = {"height": 24, "width": 32}


@pytest.fixture
def processor():
    return CMALImageProcessor(concept_names=NAMES, max_regions=3, size=SIZE)


def region(count, dim=4, scores=None, seed=0, **extra):
    rng = np.random.default_rng(seed)
    x1, y1 = rng.uniform(0, 50, count), rng.uniform(0, 20, count)
    boxes = np.stack([x1, y1, x1 + rng.uniform(1, 50, count), y1 + rng.uniform(1, 20, count)], 1)
    out = dict(features=rng.normal(size=(count, dim)).astype(np.float32), boxes=boxes, image_size=(100, 40))
    if scores is not None:
        out["scores"] = scores
    out.update(extra)
    return out


# ------------------------------------------------------------------------------------------------
# Precomputed regions
# ------------------------------------------------------------------------------------------------


def test_boxes_become_the_7d_position_by_hand(processor):
    out = processor(regions={"features": np.ones((1, 2)), "boxes": [[10, 4, 60, 24]], "image_size": (100, 40)})
    expected = [0.1, 0.1, 0.6, 0.6, 0.5, 0.5, 0.25]
    torch.testing.assert_close(out["visual_pos"][0, 0], torch.tensor(expected))
    normalised = processor(regions={"features": np.ones((1, 2)), "boxes": [[0.1, 0.1, 0.6, 0.6]], "boxes_normalized": True})
    torch.testing.assert_close(normalised["visual_pos"], out["visual_pos"])


def test_top_k_by_score_in_descending_order(processor):
    scores = [0.2, 0.9, 0.1, 0.5, 0.7]
    regions = region(5, scores=scores, tags=["dog", "cat", "person", "traffic light", "dog"])
    out = processor(regions=regions)
    order = [1, 4, 3]  # the three best, best first
    torch.testing.assert_close(out["visual_feats"][0], torch.tensor(regions["features"][order]))
    torch.testing.assert_close(out["region_scores"][0], torch.tensor([0.9, 0.7, 0.5]))
    assert out["region_concept_ids"][0].tolist() == [1, 0, 3]


def test_ties_keep_the_original_order(processor):
    out = processor(regions=region(4, tags=[0, 1, 2, 3]))  # no scores: all 1.0
    assert out["region_concept_ids"][0].tolist() == [0, 1, 2]
    assert out["region_scores"][0].tolist() == [1.0, 1.0, 1.0]


def test_padding_across_the_batch(processor):
    out = processor(regions=[region(2, tags=["cat", "dog"]), region(0), region(1, concept_ids=[2])])
    assert out["visual_feats"].shape == (3, 2, 4) and out["visual_pos"].shape == (3, 2, 7)
    assert out["visual_attention_mask"].tolist() == [[1, 1], [0, 0], [1, 0]]
    assert out["region_concept_ids"].tolist() == [[1, 0], [-1, -1], [2, -1]]
    assert out["visual_feats"][1].abs().sum() == 0 and out["visual_feats"].dtype == torch.float32


@pytest.mark.parametrize(
    "dtypes, expected",
    [((torch.float16,), torch.float16), ((torch.float16, torch.float32), torch.float32), ((torch.bfloat16,), torch.float32),
     ((torch.float64,), torch.float32)],
)  # fmt: skip
def test_features_keep_float16_and_torch_inputs(processor, dtypes, expected):
    """float16 features (as stores hold them) stay float16 until the model casts them on its device."""
    features = [torch.randn(2, 4).to(dtype) for dtype in dtypes]
    boxes = torch.tensor([[0, 0, 1, 1.0]] * 2)
    out = processor(regions=[{"features": f, "boxes": boxes, "boxes_normalized": True} for f in features])
    assert out["visual_feats"].dtype == expected
    for b, f in enumerate(features):
        assert torch.equal(out["visual_feats"][b], f.to(expected))


def test_float16_extremes_are_finite(processor):
    """The float16 finiteness check reads exponent bits: the largest, smallest and subnormal values pass."""
    extremes = np.array([[65504, -65504, 6e-8, -0.0]], np.float16)
    out = processor(regions={"features": extremes, "boxes": [[0, 0, 1, 1]], "boxes_normalized": True})
    assert torch.equal(out["visual_feats"][0], torch.from_numpy(extremes))


def test_soft_labels(processor):
    soft = np.eye(4, dtype=np.float32)[:3]
    out = processor(regions=region(3, scores=[0.1, 0.3, 0.2], soft_labels=soft))
    torch.testing.assert_close(out["region_soft_labels"][0], torch.tensor(soft[[1, 2, 0]]))


@pytest.mark.parametrize(
    "regions, message",
    [
        (dict(features=np.ones((2, 4))), r"`regions\[0\]` needs 'boxes'"),
        (dict(features=np.ones(4), boxes=np.ones((1, 4)), boxes_normalized=True), r"`regions\[0\]\['features'\]` must have shape \(N, D\), got \(4,\)"),
        (dict(features=np.ones((2, 4)), boxes=np.ones((3, 4)), boxes_normalized=True), r"`regions\[0\]\['boxes'\]` must have shape \(2, 4\), got \(3, 4\)"),
        (dict(features=np.ones((1, 4)), boxes=[[0, 0, 5, 5]]), r"boxes need a unit: pass `image_size=\(width, height\)`"),
        (dict(features=np.ones((1, 4)), boxes=[[0, 0, 5, 5]], boxes_normalized=True), r"boxes must lie in the image, got normalised range \[0, 5\]"),
        (dict(features=np.ones((1, 4)), boxes=[[0.5, 0, 0.2, 1]], boxes_normalized=True), r"x2 >= x1 and y2 >= y1"),
        (dict(features=np.full((1, 4), np.nan), boxes=[[0, 0, 1, 1]], boxes_normalized=True), r"`regions\[0\]\['features'\]` must be finite"),
        (dict(features=np.array([[1, np.nan]], np.float16), boxes=[[0, 0, 1, 1]], boxes_normalized=True), r"`regions\[0\]\['features'\]` must be finite"),
        (dict(features=np.array([[1, -np.inf]], np.float16), boxes=[[0, 0, 1, 1]], boxes_normalized=True), r"`regions\[0\]\['features'\]` must be finite"),
        (dict(features=np.array([[np.inf, 1]], np.float16), boxes=[[0, 0, 1, 1]], boxes_normalized=True), r"`regions\[0\]\['features'\]` must be finite"),
        (dict(features=np.ones((1, 4)), boxes=[[0, 0, 1, 1]], boxes_normalized=True, tags=["unicorn"]), r"tags that are not concept names: \['unicorn'\]"),
        (dict(features=np.ones((1, 4)), boxes=[[0, 0, 1, 1]], boxes_normalized=True, tags=[7]), r"concept ids must be -1 or lie in \[0, 4\), got range \[7, 7\]"),
        (dict(features=np.ones((2, 4)), boxes=[[0, 0, 1, 1]] * 2, boxes_normalized=True, tags=["dog"]), r"has 2 boxes but 1 tags"),
        (dict(features=np.ones((1, 4)), boxes=[[0, 0, 1, 1]], boxes_normalized=True, scores=[0.1, 0.2]), r"`regions\[0\]\['scores'\]` must be 1 finite numbers"),
        (dict(features=np.ones((1, 4)), boxes=[[0, 0, 10, 10]], image_size=(0, 10)), r"`regions\[0\]\['image_size'\]` must be \(width, height\) > 0"),
        ([], r"`regions` is an empty list"),
        (["not a dict"], r"`regions\[0\]` must be a dict, got str"),
    ],
)  # fmt: skip
def test_malformed_regions_raise(processor, regions, message):
    with pytest.raises(ValueError, match=message):
        processor(regions=regions)


@pytest.mark.parametrize(
    "fault, message",
    [
        (dict(boxes=[[0, 0, 120, 10]] * 2), r"`regions\[2\]` boxes must lie in the image, got normalised range \[0, 1.2\]"),
        (dict(boxes=[[50, 0, 10, 10]] * 2), r"`regions\[2\]` boxes must be \(x1, y1, x2, y2\)"),
        (dict(boxes=[[0, 0, np.nan, 10]] * 2), r"`regions\[2\]\['boxes'\]` must be finite"),
        (dict(scores=[0.5, np.inf]), r"`regions\[2\]\['scores'\]` must be 2 finite numbers"),
        (dict(concept_ids=np.array([0, 9])), r"`regions\[2\]` concept ids must be -1 or lie in \[0, 4\), got range \[0, 9\]"),
        (dict(concept_ids=np.array([-2, 1])), r"`regions\[2\]` concept ids must be -1 or lie in \[0, 4\), got range \[-2, 1\]"),
    ],
)  # fmt: skip
def test_a_batchs_value_checks_name_the_image_at_fault(processor, fault, message):
    """Values are checked once over the batch (boxes, scores, concept ids): the error still names the image."""
    regions = [region(2, seed=seed, concept_ids=np.array([0, 1])) for seed in range(4)]
    regions[2].update(fault)
    with pytest.raises(ValueError, match=message):
        processor(regions=regions)
    regions[2] = region(2, seed=2)
    assert processor(regions=regions)["visual_attention_mask"].sum() == 8


def test_feature_sizes_must_agree_across_the_batch(processor):
    with pytest.raises(ValueError, match=r"`regions\[1\]\['features'\]` has dimension 8, earlier images 4"):
        processor(regions=[region(1), region(1, dim=8)])


# ------------------------------------------------------------------------------------------------
# Raw images
# ------------------------------------------------------------------------------------------------


def expected_pixels(rgb: np.ndarray) -> torch.Tensor:
    """What a uint8 RGB array should become: bilinear resize to SIZE, /255, CHW."""
    resized = PIL.Image.fromarray(rgb).resize((SIZE["width"], SIZE["height"]), PIL.Image.Resampling.BILINEAR)
    return torch.tensor(np.asarray(resized, np.float32) / 255.0).permute(2, 0, 1)


RGB = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
GRAY = RGB[..., 0]


@pytest.mark.parametrize(
    "image, rgb",
    [
        (PIL.Image.fromarray(RGB), RGB),
        (PIL.Image.fromarray(GRAY, mode="L"), np.repeat(GRAY[..., None], 3, -1)),
        (PIL.Image.fromarray(RGB).convert("P"), np.asarray(PIL.Image.fromarray(RGB).convert("P").convert("RGB"))),
        (PIL.Image.fromarray(RGB).convert("CMYK"), np.asarray(PIL.Image.fromarray(RGB).convert("CMYK").convert("RGB"))),
        (PIL.Image.fromarray(np.dstack([RGB, np.full(GRAY.shape, 255, np.uint8)]), mode="RGBA"), RGB),
        (PIL.Image.fromarray(GRAY.astype(np.uint16) * 257), np.repeat(GRAY[..., None], 3, -1)),  # 16-bit grey
        (RGB, RGB),  # numpy HWC uint8
        (RGB.transpose(2, 0, 1), RGB),  # numpy CHW
        (RGB.astype(np.uint16) * 257, RGB),  # 16-bit RGB array
        (RGB.astype(np.float32) / 255.0, RGB),  # float in [0, 1]
        (torch.tensor(RGB).permute(2, 0, 1), RGB),  # torch CHW uint8
    ],
    ids=["RGB", "L", "P", "CMYK", "RGBA-opaque", "I;16", "np-HWC", "np-CHW", "np-uint16", "np-float", "torch-CHW"],
)
def test_image_modes(processor, image, rgb):
    pixels = processor(images=image)["pixel_values"]
    assert pixels.shape == (1, 3, 24, 32) and pixels.dtype == torch.float32
    torch.testing.assert_close(pixels[0], expected_pixels(rgb), atol=1 / 255 + 1e-6, rtol=0)


def test_transparent_pixels_become_white(processor):
    rgba = np.zeros((10, 10, 4), np.uint8)
    assert torch.allclose(processor(images=PIL.Image.fromarray(rgba, mode="RGBA"))["pixel_values"], torch.ones(1))
    palette = PIL.Image.fromarray(np.zeros((10, 10), np.uint8), mode="P")
    palette.info["transparency"] = 0
    assert torch.allclose(processor(images=palette)["pixel_values"], torch.ones(1))


def test_exif_orientation_is_applied(processor, tmp_path):
    tall = np.zeros((40, 20, 3), np.uint8)
    tall[:10] = 255  # white on top
    stored = PIL.Image.fromarray(tall).transpose(PIL.Image.Transpose.ROTATE_90)  # what the camera wrote
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "photo.png"
    stored.save(path, exif=exif)
    from_path = processor(images=str(path))["pixel_values"][0]
    torch.testing.assert_close(from_path, expected_pixels(tall), atol=1 / 255 + 1e-6, rtol=0)


def test_paths_and_batches(processor, tmp_path):
    path = tmp_path / "a.jpg"
    PIL.Image.fromarray(RGB).save(path, quality=95)
    out = processor(images=[path, RGB, str(path)])["pixel_values"]
    assert out.shape == (3, 3, 24, 32)
    torch.testing.assert_close(out[0], out[2])


@pytest.mark.parametrize("shape", [(1, 1), (3000, 4000)])
def test_tiny_and_huge_images(processor, shape):
    image = PIL.Image.new("RGB", shape[::-1], (10, 200, 30))
    pixels = processor(images=image)["pixel_values"]
    assert pixels.shape == (1, 3, 24, 32)
    torch.testing.assert_close(pixels[0, :, 5, 5], torch.tensor([10, 200, 30]) / 255.0)


def test_normalisation(processor):
    normalising = CMALImageProcessor(size=SIZE, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.25] * 3)
    raw = processor(images=RGB)["pixel_values"]
    torch.testing.assert_close(normalising(images=RGB)["pixel_values"], (raw - 0.5) / 0.25)


@pytest.mark.parametrize(
    "image, message",
    [
        ("/no/such/file.jpg", r"`images\[0\]` is a path to no file: '/no/such/file.jpg'"),
        (np.zeros((5, 5, 5), np.uint8), r"`images\[0\]` must have 1, 3 or 4 channels, got shape \(5, 5, 5\)"),
        (np.zeros((2, 2, 2, 3), np.uint8), r"must have 2 or 3 dimensions"),
        (np.zeros((0, 4, 3), np.uint8), r"`images\[0\]` is empty"),
        (np.full((4, 4, 3), np.nan, np.float32), r"`images\[0\]` has NaN or inf pixel values"),
        (np.zeros((4, 4, 3), np.int8), r"must be uint8, uint16 or float, got dtype int8"),
        (12, r"`images\[0\]` must be a PIL image, numpy array, torch tensor or file path, got int"),
        ([], r"`images` is an empty list"),
    ],
)
def test_malformed_images_raise(processor, image, message):
    with pytest.raises(ValueError, match=message):
        processor(images=image)


def test_exactly_one_source(processor):
    with pytest.raises(ValueError, match="Pass exactly one of `images`"):
        processor(images=RGB, regions=region(1))
    with pytest.raises(ValueError, match="Pass exactly one of `images`"):
        processor()


def test_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = CMALImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    assert loaded.concept_names == NAMES and loaded.size == SIZE and loaded.max_regions == 3
    torch.testing.assert_close(loaded(images=RGB)["pixel_values"], processor(images=RGB)["pixel_values"])


def test_jpeg_bytes_round_trip(processor):
    buffer = io.BytesIO()
    PIL.Image.fromarray(RGB).save(buffer, format="PNG")
    image = PIL.Image.open(io.BytesIO(buffer.getvalue()))
    torch.testing.assert_close(processor(images=image)["pixel_values"][0], expected_pixels(RGB), atol=1e-6, rtol=0)


def test_defaults_give_the_pixels_rt_detr_expects():
    """The default raw-image settings are RT-DETR's own preprocessing (640x640 bilinear, /255, no normalisation)."""
    rt_detr = pytest.importorskip("transformers.models.rt_detr.image_processing_pil_rt_detr")
    reference = rt_detr.RTDetrImageProcessorPil()(images=PIL.Image.fromarray(RGB), return_tensors="pt")["pixel_values"]
    ours = CMALImageProcessor()(images=RGB)["pixel_values"]
    assert ours.shape == reference.shape == (1, 3, 640, 640)
    torch.testing.assert_close(ours, reference, atol=1 / 255 + 1e-6, rtol=0)
