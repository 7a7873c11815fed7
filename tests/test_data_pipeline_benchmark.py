"""benchmarks/data_pipeline.py: a small run reports every figure for each worker count, cache state and path."""

import os
import sys

import pytest
from conftest import REPO


sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import data_pipeline  # noqa: E402


def test_reports_throughput_for_each_setting(tmp_path):
    reports = data_pipeline.main(["--images", "24", "--feature_dim", "16", "--regions", "3-9", "--folder", str(tmp_path),
                                  "--batch_size", "4", "--batches", "3", "--workers", "0", "1", "--rounds", "2"])  # fmt: skip
    # "mapped" (the store touched first) only in-process: forked workers fault the pages in again
    settings = [(0, "warm"), (0, "cold"), (0, "mapped"), (1, "warm"), (1, "cold")]
    assert [(r["workers"], r["cache"], r["path"]) for r in reports] == [(*s, p) for s in settings for p in ("gather", "collate", "pretokenized")]
    for report in reports:
        assert report["rounds"] == 2
        for key in ("samples_per_second", "samples_per_cpu_second", "feature_mb_per_second"):
            low, high = report[f"{key}_range"]
            assert 0 < low <= report[key] <= high
        assert report["loader_cores_per_gpu"] == pytest.approx(10_000 / report["samples_per_cpu_second"])
