"""benchmarks/hypersphere.py: the norms that reach the hypersphere of a pre-trained folder."""

import os
import sys

import pytest
import torch
from conftest import REPO

from cmal.modeling_cmal import CMALConfig, CMALForPreTraining
from cmal.training import pretrain


sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import hypersphere  # noqa: E402


@pytest.mark.parametrize("final_layer_norm", [True, False])
def test_norms_before_the_sphere(tmp_path, final_layer_norm):
    config, folder = tmp_path / "config.json", tmp_path / "out"
    CMALConfig.from_preset("tiny", unimodal_final_layer_norm=final_layer_norm).to_json_file(config)
    pretrain.main(["--model_config", str(config), "--synthetic_images", "60", "--max_train_steps", "2",
                   "--output_dir", str(folder), "--report_to", "none"])  # fmt: skip
    model = CMALForPreTraining.from_pretrained(folder)
    with torch.no_grad():  # as after long training: the last feed-forward adds more than a near-zero update
        for encoder in (model.cmal.text_encoder, model.cmal.visual_encoder):
            for dense in (encoder.layer[-1].intermediate.dense, encoder.layer[-1].output.dense):
                dense.weight.normal_(generator=torch.Generator().manual_seed(0))
            encoder.hypersphere.scale.fill_(3.0)
    model.save_pretrained(folder)
    result = hypersphere.sphere_inputs(str(folder), synthetic_images=60, batch_size=8)
    for row in result.values():
        assert row["radius"] == 3.0
        # after a LayerNorm every position has (nearly) sqrt(hidden) as norm; without it the norms vary
        assert row["mean"] == pytest.approx(32**0.5, rel=0.01) if final_layer_norm else row["std"] / row["mean"] > 0.05, row
        assert row["std"] / row["mean"] < 0.01 or not final_layer_norm, row
