"""benchmarks/objectives.py: the study's grid, its table, and a tiny end-to-end run that resumes."""

import json
import os
import sys

import numpy as np
import pytest

from conftest import REPO
from PIL import Image


sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import objectives  # noqa: E402


def test_default_grid():
    units = objectives.units(objectives.parse_args([]))
    # (a) once per seed; (b)-(d) per fraction and seed; then 5 ablations at 100% per seed.
    assert len(units) == 3 * (1 + 3 * 3) + 3 * 5
    assert len({unit["name"] for unit in units}) == len(units)
    scratch = [unit for unit in units if unit["flags"] is None]
    assert [unit["name"] for unit in scratch] == ["a-s0", "a-s1", "a-s2"]
    assert sorted({unit["fraction"] for unit in units if unit["flags"] is not None}) == [0.25, 0.5, 1.0]
    # whole seeds first, so a study cut short has comparable conditions
    assert [unit["seed"] for unit in units[:30]] == [0] * 10 + [1] * 10 + [2] * 10
    assert all(unit["condition"] in objectives.ABLATIONS for unit in units[30:])
    assert units[30]["name"] == "cmal-no-hypersphere-f1-s0"


def test_units_picks_cells_in_the_order_given_and_names_the_grid_on_a_typo():
    pick = objectives.units(objectives.parse_args(["--units", "c-f0.25-s1", "a-s2", "cmal-mask-only-no-swap-f1-s0"]))
    assert [(unit["condition"], unit["fraction"], unit["seed"]) for unit in pick] == [
        ("c: CMAL (AMC+MLM+MRM)", 0.25, 1), ("a: none", None, 2), ("CMAL, mask only (no swap)", 1.0, 0)]
    with pytest.raises(SystemExit, match=r"--units: c-f0.3-s1 not in the grid of --seeds/--fractions; .* c-f0.25-s1 "):
        objectives.units(objectives.parse_args(["--units", "c-f0.3-s1"]))


def scores(vqa, ve, nlvr2, rec, retrieval=0.1):
    return {"200": {"vqa": vqa, "ve": ve, "nlvr2": nlvr2, "rec": rec, "retrieval": retrieval}}


def test_table_gives_mean_and_std_over_seeds_and_the_gap_closed():
    args = objectives.parse_args(["--fractions", "1.0", "--seeds", "0", "1", "--finetune_steps", "200"])
    results = []
    for seed, offset in ((0, 0.0), (1, 0.2)):
        results.append({"condition": "a: none", "fraction": None, "seed": seed, "scores": scores(0.1 + offset, 0.5, 0.5, 0.3)})
        for condition in [*list(objectives.CONDITIONS)[1:], *objectives.ABLATIONS]:
            results.append({"condition": condition, "fraction": 1.0, "seed": seed, "scores": scores(0.4, 0.6 + offset, 0.7, 0.2)})
    floor_table = {task: {"chance": chance, "tags": floor, "region oracle": 0.9}
                   for task, chance, floor in (("vqa", 0.05, 0.05), ("ve", 0.33, 0.33), ("nlvr2", 0.5, 0.5), ("rec", 0.15, 0.4),
                                               ("retrieval", 0.02, 0.02))}  # fmt: skip
    table = objectives.tables(results, args, floor_table, objectives.TASKS, "named by --mean_over")
    accuracy, gaps, ablations = ({line.split(" | ")[0].lstrip("| "): line for line in part.splitlines()}
                                 for part in table.strip().split("\n\n")[1:])  # fmt: skip
    assert table.startswith("**200 fine-tuning steps**")
    assert accuracy["a: none"] == ("| a: none | 0.200 ± 0.100 (n=2) | 0.500 ± 0.000 (n=2) | 0.500 ± 0.000 (n=2) "
                                   "| 0.300 ± 0.000 (n=2) | 0.100 ± 0.000 (n=2) |")
    assert accuracy["chance"] == "| chance | 0.050 | 0.330 | 0.500 | 0.150 | 0.020 |"
    assert accuracy["floor (no image)"] == "| floor (no image) | 0.050 | 0.330 | 0.500 | 0.400 | 0.020 |"
    # gap closed of a, per seed: mean of (0.1|0.3 - 0.05) / 0.85, (0.5 - 0.33) / 0.57, 0 / 0.4, (0.3 - 0.4) / 0.5
    per_seed = [np.mean([(vqa - 0.05) / 0.85, 0.17 / 0.57, 0.0, -0.1 / 0.5]) for vqa in (0.1, 0.3)]
    assert gaps["a: none"] == f"| a: none | {np.mean(per_seed):.3f} ± {np.std(per_seed):.3f} (n=2) |"
    # ablation rows end with the mean gap closed: per seed of (0.4|0.4 - 0.05) / 0.85, (0.6|0.8 - 0.33) / 0.57, ...
    per_seed = [np.mean([0.35 / 0.85, (ve - 0.33) / 0.57, 0.2 / 0.4, -0.2 / 0.5]) for ve in (0.6, 0.8)]
    assert ablations["CMAL, mask only (no swap)"].endswith(f"| 0.100 ± 0.000 (n=2) | {np.mean(per_seed):.3f} ± {np.std(per_seed):.3f} (n=2) |")
    # the mean over the learnable tasks only: per seed of (0.1|0.3 - 0.05) / 0.85 and (0.3 - 0.4) / 0.5
    table = objectives.tables(results, args, floor_table, ["vqa", "rec"], "learnable")
    assert "| pre-training: mean gap closed over vqa, rec (learnable) | 100% |" in table
    per_seed = [np.mean([(vqa - 0.05) / 0.85, -0.1 / 0.5]) for vqa in (0.1, 0.3)]
    assert f"| a: none | {np.mean(per_seed):.3f} ± {np.std(per_seed):.3f} (n=2) |" in table
    assert "| pre-training: mean gap closed over no task (none) |" in objectives.tables(results, args, floor_table, [], "none")
    # progress: the units left at the mean time of those done, over the workers
    assert objectives.time_left([{"seconds": 600}, {"seconds": 1200}], 6, 2) == "about 30 min left"
    assert objectives.time_left([{"seconds": 600}], 1, 2) == "done"
    # a cell of one seed shows no spread it does not have
    assert objectives.mean_std([0.25]) == "0.250 (n=1)" and objectives.mean_std([]) == "—"


def test_the_mean_is_over_the_tasks_learnability_finds_learnable_measured_once(tmp_path, monkeypatch):
    calls, world, floor_table, trained = [], object(), object(), object()  # the study's own, handed on as they are

    def measure(*args):
        calls.append(args)
        return {task: {"learnable": task in ("vqa", "rec"), "gap_closed": 0.8 if task in ("vqa", "rec") else 0.05}
                for task in objectives.TASKS}  # fmt: skip

    monkeypatch.setattr(objectives.learnability, "measure", measure)
    args = objectives.parse_args(["--output_dir", str(tmp_path), "--synthetic_images", "300", "--finetune_steps", "200", "900"])
    report = objectives.parse_args(["--report", "--output_dir", str(tmp_path)])
    assert objectives.mean_tasks(report, world, floor_table, trained) == (
        list(objectives.TASKS), "learnability not measured yet: every task")  # --report runs nothing
    assert calls == []
    mean_over, why = objectives.mean_tasks(args, world, floor_table, trained)
    assert mean_over == ["vqa", "rec"] and why.endswith("; left out: ve (5%), nlvr2 (5%)") and "at 900 steps" in why
    (call,) = calls
    assert call[:3] == (world, floor_table, trained)
    assert call[3].steps == 900 and call[3].tasks == list(objectives.TASKS) and call[3].split == "validation"
    assert json.loads((tmp_path / "learnability.json").read_text())["vqa"]["learnable"]
    assert objectives.mean_tasks(args, world, floor_table, trained) == (mean_over, why) and len(calls) == 1  # kept: a resumed study measures nothing
    named = objectives.parse_args(["--output_dir", str(tmp_path / "other"), "--mean_over", "ve"])
    assert objectives.mean_tasks(named, world, floor_table, trained) == (["ve"], "named by --mean_over") and len(calls) == 1


def test_arms_match_steps_and_curriculum_whatever_their_fraction_and_none_has_itm(tmp_path, monkeypatch):
    from cmal.training import pretrain

    seen = {}

    def fake_pretrain(argv):
        seen[argv[argv.index("--corpus_fraction") + 1]] = argv
        return {"steps": 10, "final_losses": {}, "validation": {}}

    monkeypatch.setattr(pretrain, "main", fake_pretrain)
    monkeypatch.setattr(objectives, "finetune_run", lambda *a, **k: {"eval": {"accuracy": 0.5, "text_to_image_r1": 50.0}})
    monkeypatch.setattr(objectives, "METRICS", {task: ("accuracy", 1) for task in objectives.TASKS} | {"retrieval": ("text_to_image_r1", 100)})
    args = objectives.parse_args(["--output_dir", str(tmp_path), "--pretrain_steps", "1234", "--finetune_steps", "5"])
    for unit in objectives.units(args)[:4]:  # a, then b at 25, 50 and 100%
        objectives.run_unit((unit, args))

    def flag(argv, name):
        return [argv[i + 1] for i, value in enumerate(argv) if value == name]

    assert sorted(seen) == ["0.25", "0.5", "1.0"]
    for fraction, curriculum in (("0.25", "24"), ("0.5", "12"), ("1.0", "6")):
        argv = seen[fraction]
        assert flag(argv, "--max_train_steps") == ["1234"] and "--num_train_epochs" not in argv
        assert flag(argv, "--curriculum_epochs") == [curriculum] and flag(argv, "--itm") == ["0"]


def test_tiny_study_runs_and_resumes(tmp_path):
    argv = ["--output_dir", str(tmp_path), "--model_config", "tiny", "--synthetic_images", "200", "--seeds", "0",
            "--fractions", "1.0", "--pretrain_steps", "2", "--finetune_steps", "1", "2", "--no_ablations", "--jobs", "1",
            "--mean_over", *objectives.TASKS]  # fmt: skip
    objectives.main(argv)
    summary = json.loads((tmp_path / "results.json").read_text())
    assert sorted(r["name"] for r in summary["results"]) == ["a-s0", "b-f1-s0", "c-f1-s0", "d-f1-s0"]
    for result in summary["results"]:
        assert set(result["scores"]) == {"1", "2"}
        assert all(0 <= result["scores"]["2"][task] <= 1 for task in objectives.STUDY_TASKS), result
        assert (result["condition"] == "a: none") == ("pretrain_steps" not in result)
    assert not any("itm_loss" in r.get("pretrain_final_losses", {}) for r in summary["results"])  # no arm has ITM
    contrastive = next(r for r in summary["results"] if r["name"] == "b-f1-s0")
    assert "itc_loss" in contrastive["pretrain_final_losses"] and "amc_token_loss" not in contrastive["pretrain_final_losses"]
    assert "mrm_feature_loss" not in contrastive["pretrain_final_losses"] and "itc_images" in contrastive["pretrain_validation"]
    cmal = next(r for r in summary["results"] if r["name"] == "c-f1-s0")["pretrain_final_losses"]
    assert "amc_token_loss" in cmal and "mrm_feature_loss" in cmal and "itc_loss" not in cmal
    assert not (tmp_path / "c-f1-s0" / "vqa").exists()  # fine-tuned weights are dropped, the metric kept
    with Image.open(tmp_path / "objectives.png") as image:
        assert image.size[0] > 400
    assert (tmp_path / "table.md").read_text().count("\n| ") >= 10

    # A second run finds every unit done and redoes none of them.
    logs = {path: os.path.getmtime(path) for path in tmp_path.glob("*/log.txt")}
    objectives.main(argv)
    assert {path: os.path.getmtime(path) for path in tmp_path.glob("*/log.txt")} == logs
    assert json.loads((tmp_path / "results.json").read_text())["results"] == summary["results"]
    # --report tabulates what is done, running nothing: here unit b has not finished
    (tmp_path / "b-f1-s0" / "result.json").unlink()
    report = objectives.main([*argv, "--report"])
    assert [r["name"] for r in report["results"]] == ["a-s0", "c-f1-s0", "d-f1-s0"]
    assert not (tmp_path / "b-f1-s0" / "result.json").exists() and "| b: contrastive (ITC+MLM) | — |" in (tmp_path / "table.md").read_text()


def test_curves_score_from_scratch_fine_tuning_along_the_way(tmp_path):
    argv = ["--output_dir", str(tmp_path), "--model_config", "tiny", "--synthetic_images", "200", "--curves",
            "--curve_steps", "4", "--curve_every", "2", "--jobs", "1"]  # fmt: skip
    curves = objectives.main(argv)
    assert [c["task"] for c in curves] == list(objectives.STUDY_TASKS)
    assert all([point["step"] for point in c["curve"]] == [2, 4] for c in curves)
    assert all(0 <= point["score"] <= 1 for c in curves for point in c["curve"])
    assert (tmp_path / "curves.md").read_text().splitlines()[2].startswith("| 2 | ")
    assert not (tmp_path / "curves" / "vqa").exists()
