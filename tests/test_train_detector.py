"""training/train_detector.py: a short run learns to detect the world's shapes on held-out world images, and its
folder is a transformers detector whose processor gives the pixels training used."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForObjectDetection


from cmal.training import train_detector, train_detector_run
from cmal.training.data import synthetic


WORLD = ["--synthetic_images", "200"]  # the validation split: 20 images


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("detector") / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = train_detector.main([*WORLD, "--output_dir", str(folder), "--max_train_steps", "300", "--logging_steps", "100"])
    return folder, results, printed.getvalue()


def test_a_short_run_detects_held_out_shapes_and_reads_colours(trained):
    """300 steps, measured on these 20 images: mAP@0.5 0.095, colour 0.672, size 0.812 (untrained: mAP 0.000,
    colour about 1/8; the default 1,500 steps: mAP@0.5 0.922, colour 0.972, size 0.989 on 200)."""
    folder, results, _ = trained
    assert results["validation"]["images"] == 20 and results["validation"]["objects"] > 20
    assert results["validation"]["map_50"] > 0.03
    assert results["validation"]["colour_accuracy"] > 0.4 and results["validation"]["size_accuracy"] > 0.6
    assert json.loads((folder / "eval_results.json").read_text())["validation"] == results["validation"]


def test_a_run_below_its_targets_says_so_with_the_defaults_that_reach_them(trained):
    _, results, printed = trained
    assert f"held-out mAP@0.5 {results['validation']['map_50']:.3f}" in printed
    assert ("warning: below this detector's targets (mAP@0.5 0.9, colour 0.9), which the defaults reach "
            "(--max_train_steps 1500, batch 16)") in printed


def test_the_folder_loads_as_a_transformers_detector(trained):
    folder, _, _ = trained
    model = AutoModelForObjectDetection.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    assert model.config.id2label == dict(enumerate(synthetic.SHAPES))
    scene = synthetic.generate_scene(np.random.default_rng(5))
    pixels, _ = train_detector_run.pixels_and_target(scene)
    processed = processor(images=synthetic.render(scene), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(processed[0], pixels, atol=1e-6, rtol=0)  # what training saw, exactly
    with torch.no_grad():
        outputs = model(pixel_values=processed)
    assert outputs.logits.shape == (1, 20, len(synthetic.SHAPES)) and outputs.pred_boxes.shape == (1, 20, 4)


def test_training_scenes_are_fresh_per_step_and_none_is_a_world_image():
    def batch(seed, step, size=4):  # as the loop reads them: in order
        return train_detector_run.collate_scenes([train_detector_run.FreshScenes(seed, 40)[step * size + k] for k in range(size)]).values()

    pixels, targets = batch(0, 3)
    again, _ = batch(0, 3)
    other, _ = batch(0, 4)
    assert pixels.shape == (4, 3, synthetic.IMAGE_SIZE, synthetic.IMAGE_SIZE) and torch.equal(pixels, again)
    assert not torch.equal(pixels, other)
    for target in targets:
        assert len(target["class_labels"]) == len(target["boxes"]) >= 1
        assert ((target["boxes"] > 0) & (target["boxes"] <= 1)).all()
    world = [synthetic.generate_scene(np.random.default_rng([0, i, 0])) for i in range(200)]
    drawn = [synthetic.generate_scene(np.random.default_rng([0, k, train_detector_run.DETECTOR_STREAM])) for k in range(200)]
    assert not {tuple(obj.box for obj in scene.objects) for scene in world} & {tuple(obj.box for obj in scene.objects) for scene in drawn}


def test_a_non_empty_output_dir_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty; it holds notes.txt: or pass --overwrite_output_dir"):
        train_detector.main([*WORLD, "--output_dir", str(tmp_path), "--max_train_steps", "1"])
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_killed_detector_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """The detector trains through the shared loop: its checkpoints resume exactly, as pre-training's do."""
    from conftest import die_after_saving
    from safetensors.torch import load_file

    run = [*WORLD, "--max_train_steps", "4", "--per_device_train_batch_size", "2", "--report_to", "none", "--logging_steps", "1"]
    train_detector.main([*run, "--output_dir", str(tmp_path / "whole")])
    revive = die_after_saving(monkeypatch, 2)
    with pytest.raises(SystemExit, match="130"):  # Ctrl-C after step 2's checkpoint
        train_detector.main([*run, "--output_dir", str(tmp_path / "cut"), "--checkpointing_steps", "2"])
    revive()
    results = train_detector.main([*run, "--output_dir", str(tmp_path / "cut"), "--checkpointing_steps", "2",
                                   "--resume_from_checkpoint", "latest"])  # fmt: skip
    assert results["steps"] == 4
    whole, resumed = (load_file(tmp_path / name / "model.safetensors") for name in ("whole", "cut"))
    assert whole.keys() == resumed.keys()
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=1e-6, msg=key)
