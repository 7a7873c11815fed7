"""benchmarks/learnability.py: every task trains and is scored against its floor and ceiling; REC learns."""

import json
import os
import sys

import pytest
from conftest import REPO

from cmal.training.data import synthetic


sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import floors  # noqa: E402
import learnability  # noqa: E402


pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 300-image world and its trained region reader (fitting it takes ~10 s, so it is fitted once)."""
    path = synthetic.build_world(tmp_path_factory.mktemp("learnability") / "w", num_images=300)
    return path, floors.TrainedReader(synthetic.load_world(path))


@pytest.fixture(autouse=True)
def default_world(world, monkeypatch):
    """`world` as the default one. The text readers' regressions (~45 s on VQA) are left out of the floors:
    tests/test_floors.py checks them, and here the floor of VQA, VE and NLVR2 falls back to chance."""
    path, reader = world
    monkeypatch.setattr(floors.synthetic, "default_world", lambda **kwargs: path)  # the module learnability reads too
    monkeypatch.setattr(floors, "TrainedReader", lambda world: reader)
    monkeypatch.setattr(floors, "text_floors", lambda world, task, split="test": {})


def test_cli_prints_the_curves_of_every_task(tmp_path, capsys):
    results = learnability.main(["--num_images", "300", "--steps", "10", "--eval_every", "5", "--output", str(tmp_path / "l.json")])
    out = capsys.readouterr().out
    assert "| task (validation) | floor | oracle | step 5 | step 10 | gap closed | seconds |" in out
    assert set(results) == set(learnability.TASK_NAMES) == set(json.loads((tmp_path / "l.json").read_text()))
    for task, r in results.items():
        assert f"| {task} | " in out and f"{task}: " in out
        assert [point["step"] for point in r["curve"]] == [5, 10] and 0 <= r["score"] <= 1, (task, r)
        assert 0 <= r["floor"] < r["oracle"] <= 1
        assert r["gap_closed"] == pytest.approx((r["score"] - r["floor"]) / (r["oracle"] - r["floor"]))


def test_rec_learns_past_the_tag_rule(world):
    """300 steps on 300 images: validation accuracy measured 0.64 (0.61-0.82 over training seeds 0-4), against
    0.42 for a uniform pick among the regions tagged with the named shape."""
    results = learnability.main(["--num_images", "300", "--tasks", "rec", "--steps", "300", "--eval_every", "300"])
    tags = floors.rec_rules(synthetic.load_world(world[0]), "validation")["tags"]
    assert results["rec"]["score"] > tags + 0.1, (results["rec"], tags)


def test_words_share_the_embedding_of_the_attribute_they_name():
    """Grounding is given: "balls" and "orb" embed as the sphere a region's shape embeds as, "red" as its colour,
    "large" as its size; other words as no attribute."""
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "balls", "orb", "red", "large", "hoop", "is"])}
    shapes, colours = len(synthetic.SHAPES), len(synthetic.COLOURS)
    symbols = learnability.word_symbols(vocab).tolist()
    sphere, ring = synthetic.SHAPES.index("sphere"), synthetic.SHAPES.index("ring")
    red, large = shapes + list(synthetic.COLOURS).index("red"), shapes + colours + list(synthetic.SIZES).index("large")
    none = learnability.NUM_SYMBOLS
    assert symbols == [none, none, none, none, sphere, sphere, red, large, ring, none]


def test_floors_prints_what_the_small_model_learns(tmp_path, capsys):
    table = floors.main(["--num_images", "300", "--split", "validation", "--learnability", "4", "--output", str(tmp_path / "f.json")])
    assert "| task (validation) | floor | oracle | step 4 | gap closed | seconds |" in capsys.readouterr().out
    saved = json.loads((tmp_path / "f.json").read_text())
    assert saved["learnability"] == table["learnability"] and saved["learnability"]["steps"] == 4
    for task in learnability.TASK_NAMES:
        r = saved["learnability"][task]
        assert [point["step"] for point in r["curve"]] == [4]
        assert r["gap_closed"] == pytest.approx(floors.gap_closed(r["score"], saved[task]))
