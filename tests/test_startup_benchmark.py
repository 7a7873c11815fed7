"""benchmarks/startup.py: the corpus it builds is a valid `--dataset` folder, and the pairs it times are exact."""

import os
import sys

import datasets
import pytest
from conftest import REPO

from cmal.training.data.pretraining import ImageTextPairs
from cmal.training.data.region_store import load_region_store


sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import startup  # noqa: E402


def test_startup_report_and_the_joined_lengths(tmp_path):
    report = startup.main(["--captions", "500", "--folder", str(tmp_path)])
    assert (report["captions"], report["images"]) == (500, 100)
    assert 0 < report["join_seconds"] <= report["startup_seconds"]
    captions = datasets.load_from_disk(str(tmp_path / "captions"))
    pairs = ImageTextPairs(captions, load_region_store(str(tmp_path / "regions"))[0])
    assert pairs.image_rows.tolist() == [i % 100 for i in range(500)]  # the join done in Arrow
    assert pairs.lengths().tolist() == [len(text.split()) + 2 for text in captions["text"]]  # single-spaced words


@pytest.mark.parametrize("part", [1_000_000, 2])  # 2: counted in three parts, in threads
def test_lengths_count_space_separated_words(tmp_path, monkeypatch, part):
    from cmal.training.data import pretraining

    monkeypatch.setattr(pretraining, "WORD_COUNT_PART", part)
    startup.build_corpus(str(tmp_path), 5)
    texts = ["a man on a bike", "one", "  two  words ", "", "tab\tand\nnewline"]
    captions = datasets.Dataset.from_dict({"image_id": ["img0"] * 5, "text": texts})
    pairs = ImageTextPairs(captions, load_region_store(str(tmp_path / "regions"))[0])
    # spaces + 1 (+ 2 regions): exact for single-spaced captions, a near count otherwise (only grouping uses it)
    assert pairs.lengths().tolist() == [7, 3, 8, 3, 3]


def test_the_encoding_is_timed_first_and_cached(tmp_path):
    report = startup.main(["--captions", "500", "--folder", str(tmp_path), "--pretokenize"])
    assert 0 < report["encoded_load_seconds"] and 0 < report["encode_seconds"]
    assert report["encode_microseconds_per_caption"] == pytest.approx(report["encode_seconds"] / 500 * 1e6)
    assert len(list((tmp_path / "captions").glob("cache-*.arrow"))) == 1  # the encoded table, beside the captions
