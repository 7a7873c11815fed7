"""benchmarks/data_pipeline.py: a small run reports every figure for each worker count and cache state."""

import os
import sys

import pytest
from conftest import REPO


sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import data_pipeline  # noqa: E402


def test_reports_throughput_for_each_setting(tmp_path):
    reports = data_pipeline.main(["--images", "24", "--feature_dim", "16", "--regions", "3-9", "--folder", str(tmp_path),
                                  "--batch_size", "4", "--batches", "3", "--workers", "0", "1"])  # fmt: skip
    # "mapped" (the store touched first) only in-process: forked workers fault the pages in again
    assert [(r["workers"], r["cache"]) for r in reports] == [(0, "warm"), (0, "cold"), (0, "mapped"), (1, "warm"), (1, "cold")]
    for report in reports:
        assert report["samples"] == 12
        assert report["samples_per_second"] > 0 and report["samples_per_cpu_second"] > 0
        assert report["loader_cores_per_gpu"] == pytest.approx(10_000 / report["samples_per_cpu_second"])
        assert report["feature_mb_per_second"] > 0
