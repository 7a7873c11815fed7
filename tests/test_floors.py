"""benchmarks/floors.py: on the synthetic world no reader of the text alone beats chance by more than 0.03."""

import os
import sys

import pytest
from conftest import REPO

from cmal.training.data import synthetic


sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import floors  # noqa: E402


pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """4000 images (14 s): a test split of 700-2,200 items per task, so chance + 0.03 is ~1.5-2 standard errors."""
    return synthetic.load_world(synthetic.build_world(tmp_path_factory.mktemp("floors") / "world", num_images=4000))


@pytest.fixture(scope="module")
def table(world):
    return floors.floors(world)


@pytest.mark.parametrize("task", ["vqa", "ve", "nlvr2"])
@pytest.mark.parametrize("reader", ["majority", "text lookup", "text classifier"])
def test_text_alone_stays_at_chance(table, task, reader):
    row = table[task]
    assert row[reader] <= row["chance"] + 0.03, (task, reader, row)


def test_chance_and_the_tag_floor_of_rec(table, world):
    rec = table["rec"]
    assert 0.1 < rec["chance"] < 0.25  # 4-8 regions an image, distractors included
    # The tag of the named shape leaves at least two regions (the target's twin), so tags alone reach
    # at most about one half: measured 0.43 (tag noise and jittered boxes make it less than 0.5).
    assert rec["chance"] < rec["tags"] <= 0.5
    assert table["vqa"]["chance"] == pytest.approx(0.28, abs=0.02)  # 5 types of 2-8 answers


@pytest.mark.parametrize("task", ["vqa", "ve", "nlvr2", "rec"])
def test_the_regions_answer_far_above_every_floor(table, task):
    """The symbolic reader of the regions: measured 0.89 (VQA), 0.88 (VE), 0.93 (NLVR2), 0.82 (REC); the
    detector's 10% tag noise is most of what it misses."""
    row = table[task]
    assert row["region oracle"] >= 0.75 and row["region oracle"] > floors.floor(row) + 0.3, row
    assert floors.gap_closed(floors.floor(row), row) == 0 and floors.gap_closed(row["region oracle"], row) == pytest.approx(1)


def test_retrieval_has_chance_and_a_ceiling_below_one(table):
    """A caption true of k of the 50 images caps text->image R@1 at 1/k, even for the region oracle."""
    row = table["retrieval"]
    assert row["chance"] == pytest.approx(1 / 50)
    assert 0.5 < row["region oracle"] < 0.95 and floors.floor(row) == row["chance"], row


def test_text_classifier_would_see_a_leak(world):
    """The floor check can fail: labels that follow the text (VE labelled by its first word) are found."""
    leaky = dict(world)
    label_of = {}
    ve = world["ve"].map(lambda item: {"label": label_of.setdefault(item["hypothesis"].split()[1], len(label_of) % 3)})
    leaky["ve"] = ve
    assert floors.text_floors(leaky, floors.TASKS["ve"])["text classifier"] > 0.6  # measured 0.85; chance 0.33


def test_cli_prints_the_table(tmp_path, monkeypatch, capsys):
    path = synthetic.build_world(tmp_path / "w", num_images=300)
    monkeypatch.setattr(floors.synthetic, "default_world", lambda **kwargs: path)
    table = floors.main(["--num_images", "300", "--output", str(tmp_path / "floors.json")])
    out = capsys.readouterr().out
    assert "| vqa |" in out and "| rec |" in out and "| retrieval |" in out and (tmp_path / "floors.json").is_file()
    assert set(table) == {"vqa", "ve", "nlvr2", "rec", "retrieval"}
    # retrieval counts what it scores: the captions of the split's first 50 images, not the whole table
    world = synthetic.load_world(path)
    images, captions = floors.retrieval_items(world, "test")
    assert len(images) == min(50, len(set(world["captions"]["test"]["image_id"]))) and len(captions) >= len(images)
    assert f"| retrieval | {len(captions)} captions of {len(images)} images |" in out
    floors.main(["--num_images", "300", "--split", "validation"])
    assert "| task | validation items |" in capsys.readouterr().out
