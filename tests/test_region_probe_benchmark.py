"""benchmarks/region_probe.py: linear probes read shape, colour and size back from each reading of the regions."""

import json
import os
import sys

import pytest
from conftest import REPO

from cmal.training.data import synthetic


sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import region_probe  # noqa: E402


pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthetic.load_world(synthetic.build_world(tmp_path_factory.mktemp("probe") / "world", num_images=120))


def test_probes_read_the_attributes_back_and_beat_chance(world):
    model, processor = region_probe.random_model(world, "tiny")
    result = region_probe.probe(world, model, processor, max_train_images=60)
    assert set(result) == {"chance", *region_probe.READINGS}
    assert all(set(result[reading]) == set(region_probe.ATTRIBUTES) for reading in result)
    assert all(0 < value <= 1 for row in result.values() for value in row.values())
    # the stored features carry the shape and the colour, the box the size: a probe misaligned with its labels
    # would sit at chance
    for attribute in region_probe.ATTRIBUTES:
        assert result["input"][attribute] >= result["chance"][attribute] + 0.2, (attribute, result)
    table = region_probe.markdown(result).splitlines()
    assert table[0] == "| reading | shape | colour | size |" and [line.split(" | ")[0] for line in table[2:]] == [
        "| chance", "| input", "| regions", "| unified"]


def test_a_pre_trained_folder_is_probed_from_the_command_line(world, tmp_path, monkeypatch):
    model, processor = region_probe.random_model(world, "tiny", seed=1)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    monkeypatch.setattr(synthetic, "default_world", lambda **kwargs: None)
    monkeypatch.setattr(synthetic, "load_world", lambda path: world)
    result = region_probe.main([str(tmp_path / "model"), "--max_train_images", "60", "--output", str(tmp_path / "probe.json")])
    assert json.loads((tmp_path / "probe.json").read_text()) == result
    assert result == region_probe.probe(world, model, processor, 60)  # the saved weights, not new ones
    assert result["unified"] != region_probe.probe(world, *region_probe.random_model(world, "tiny", seed=2), 60)["unified"]


@pytest.mark.parametrize("argv", [[], ["some/folder", "--random"]])
def test_a_model_or_random_weights_not_both(argv, capsys):
    with pytest.raises(SystemExit):
        region_probe.parse_args(argv)
    assert "give a model folder or --random (not both)" in capsys.readouterr().err
