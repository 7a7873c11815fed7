"""training/extract_regions.py: resumable extraction, and parity with the in-model raw-image path."""

import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import REPO
from test_detector import LABELS, cmal_config

from cmal.modeling_cmal import CMALForQuestionAnswering, CMALModel
from cmal.processors.image_processing_cmal import CMALImageProcessor
from cmal.training import extract_regions, region_extraction
from cmal.training.data.region_store import RegionStoreWriter, load_region_store, row_to_regions





@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    CMALForQuestionAnswering(cmal_config()).save_pretrained(folder)
    CMALImageProcessor(concept_names=LABELS, size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir()
    for i in range(7):
        name = f"sub/img{i}.png" if i % 3 == 0 else f"img{i}.jpg"
        PIL.Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


def run(checkpoint, image_dir, output_dir, **kwargs):
    model = CMALModel.from_pretrained(checkpoint)
    processor = CMALImageProcessor.from_pretrained(checkpoint)
    return region_extraction.extract(model, processor, str(image_dir), str(output_dir), **kwargs)


def test_extraction_resumes_after_a_kill(checkpoint, image_dir, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    assert run(checkpoint, image_dir, clean, batch_size=2, shard_size=2) == 7
    reference, meta = load_region_store(str(clean))
    assert reference["image_id"] == sorted(reference["image_id"]) and len(reference) == 7
    assert meta["source"] == "detector" and meta["concept_names"] == LABELS and meta["feature_dim"] == 32

    # Kill the run right after its second shard lands: what was buffered is lost, shards stay.
    killed = tmp_path / "killed"
    flush = RegionStoreWriter.flush
    calls = {"n": 0}

    def flush_then_die(self):
        flush(self)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(RegionStoreWriter, "flush", flush_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(checkpoint, image_dir, killed, batch_size=2, shard_size=2)
    monkeypatch.setattr(RegionStoreWriter, "flush", flush)
    assert len(load_region_store(str(killed))[0]) == 4

    assert run(checkpoint, image_dir, killed, batch_size=3, shard_size=2) == 3  # only the missing images
    resumed, _ = load_region_store(str(killed))
    assert resumed["image_id"] == reference["image_id"]  # each image once, in order
    for a, b in zip(resumed.with_format("numpy"), reference.with_format("numpy")):
        np.testing.assert_allclose(a["features"], b["features"], rtol=1e-3, atol=1e-6)  # another batch size
        np.testing.assert_array_equal(a["concept_ids"], b["concept_ids"])
    assert run(checkpoint, image_dir, killed) == 0


def test_stored_regions_match_the_in_model_path(checkpoint, image_dir, tmp_path):
    """A model fed the extracted store answers as it does on the raw image (float16 rounding aside)."""
    run(checkpoint, image_dir, tmp_path / "store")
    store, _ = load_region_store(str(tmp_path / "store"))
    store = store.with_format("numpy")
    model = CMALForQuestionAnswering.from_pretrained(checkpoint).eval()
    processor = CMALImageProcessor.from_pretrained(checkpoint)
    text = dict(input_ids=torch.tensor([[1, 11, 12, 2]] * 7))
    paths = [path for _, path in region_extraction.list_images(str(image_dir))]
    raw = model(**text, pixel_values=processor(images=[PIL.Image.open(p) for p in paths])["pixel_values"]).logits
    regions = processor(regions=[row_to_regions(row) for row in store])
    stored = model(**text, **regions).logits
    torch.testing.assert_close(stored, raw, atol=2e-3, rtol=2e-3)
    features = model.cmal.detect_regions(processor(images=PIL.Image.open(paths[0]))["pixel_values"])["visual_feats"][0]
    np.testing.assert_allclose(store[0]["features"], features.numpy(), rtol=1e-3, atol=1e-3)


def test_image_ids_and_sizes(checkpoint, image_dir, tmp_path):
    run(checkpoint, image_dir, tmp_path / "store")
    store, _ = load_region_store(str(tmp_path / "store"))
    assert store["image_id"] == ["img1", "img2", "img4", "img5", "sub/img0", "sub/img3", "sub/img6"]
    assert store[0]["image_width"] == 50 and store[0]["image_height"] == 41


def test_cli(checkpoint, image_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "training/extract_regions.py", "--model_name_or_path", str(checkpoint),
               "--image_dir", str(image_dir), "--output_dir", str(tmp_path / "out"), "--shard_size", "3"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "added 7 images" in result.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "cmal_region_store.json", "shard-00000", "shard-00001", "shard-00002",
    ]  # fmt: skip
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert "added 0 images" in again.stdout


def test_folder_without_images(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="holds no images"):
        run(checkpoint, tmp_path, tmp_path / "out")


def test_upright_size_follows_the_exif_orientation(tmp_path):
    image = PIL.Image.new("RGB", (40, 20))
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display: the upright image is 20 wide, 40 tall
    image.save(tmp_path / "rotated.jpg", exif=exif)
    image.save(tmp_path / "plain.jpg")
    assert region_extraction.upright_size(region_extraction.open_image(str(tmp_path / "rotated.jpg"))) == (20, 40)
    assert region_extraction.upright_size(region_extraction.open_image(str(tmp_path / "plain.jpg"))) == (40, 20)


def test_two_files_of_one_image_id_are_refused(tmp_path):
    for name in ("a.jpg", "a.png", "b.jpg"):
        PIL.Image.new("RGB", (8, 8)).save(tmp_path / name)
    with pytest.raises(ValueError, match=r"1 image ids name two files each, e.g. '.*a.jpg' and '.*a.png'"):
        region_extraction.list_images(str(tmp_path))


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory):
    from cmal.training.data import synthetic

    folder = tmp_path_factory.mktemp("scenes")
    for i in range(5):
        synthetic.render(synthetic.generate_scene(np.random.default_rng(i))).save(folder / f"scene{i}.png")
    return folder


def test_a_plain_detector_folder_extracts_what_its_wrapped_model_detects(synthetic_detector, scene_dir, tmp_path):
    """`--detector`: the store holds what the CMAL-wrapped detector finds on the pixels of the detector's own
    processor (`from_detector_processor` reproduces them), top `--num_regions` above `--score_threshold`."""
    from transformers import AutoImageProcessor

    detector_folder = synthetic_detector
    command = [sys.executable, "training/extract_regions.py", "--detector", str(detector_folder), "--image_dir",
               str(scene_dir), "--output_dir", str(tmp_path / "store"), "--num_regions", "8"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    store, meta = load_region_store(str(tmp_path / "store"))
    assert meta["feature_dim"] == 64 and meta["concept_names"] == ["sphere", "cube", "cylinder", "cone", "star", "ring"]
    assert meta["detector"]["name_or_path"] == str(detector_folder) and store["num_regions"] == [8] * 5

    model, processor = region_extraction.detector_model(str(detector_folder), 8, 0.0)
    images = [PIL.Image.open(scene_dir / f"scene{i}.png") for i in range(5)]
    pixels = processor(images=images)["pixel_values"]
    own = AutoImageProcessor.from_pretrained(detector_folder)(images=images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, own, atol=1e-6, rtol=0)
    # a smaller input (the faster photo path): the detector's settings but that size
    smaller = CMALImageProcessor.from_detector_processor(AutoImageProcessor.from_pretrained(detector_folder),
                                                         size={"height": 96, "width": 96})  # fmt: skip
    assert smaller.size == {"height": 96, "width": 96} and smaller.do_normalize == processor.do_normalize
    assert smaller(images=images)["pixel_values"].shape == (5, 3, 96, 96)
    regions = model.eval().detect_regions(pixels)
    for i, row in enumerate(store.with_format("numpy")):
        np.testing.assert_allclose(row["features"], regions["visual_feats"][i].numpy(), rtol=1e-3, atol=1e-3)
        np.testing.assert_array_equal(row["concept_ids"], regions["region_concept_ids"][i].numpy())


def test_region_limits_go_with_a_detector_folder_only(checkpoint, image_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        extract_regions.main(["--model_name_or_path", str(checkpoint), "--image_dir", str(image_dir),
                              "--output_dir", str(tmp_path / "out"), "--num_regions", "5"])  # fmt: skip
    assert "--num_regions and --score_threshold go with --detector" in capsys.readouterr().err
