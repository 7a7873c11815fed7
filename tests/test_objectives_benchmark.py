"""benchmarks/objectives.py: matched arms, stages chosen on validation, intervals on the test split, and a tiny
end-to-end study that resumes."""

import json
import os
import sys

import numpy as np
import pytest

from conftest import REPO
from PIL import Image


sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import objectives  # noqa: E402
from objectives import Unit  # noqa: E402


def flag(argv, name):
    return [argv[i + 1] for i, value in enumerate(argv) if value == name]


def test_arms_differ_only_in_their_objective():
    contrastive, cmal = Unit("contrastive", 0, 3e-4, 5.0), Unit("cmal", 0, 1e-3, 1.0)
    both = Unit("cmal+itc", 0, 1e-3, 1.0, itc=5.0)
    for unit in (contrastive, cmal, both):
        assert flag(unit.flags(), "--itm") == ["0"]  # no arm has ITM
    assert flag(contrastive.flags(), "--itc") == ["5"] and flag(contrastive.flags(), "--amc") == ["0"]
    assert flag(contrastive.flags(), "--mrm") == ["0"] and flag(contrastive.flags(), "--learning_rate") == ["0.0003"]
    assert flag(cmal.flags(), "--amc") == ["1"] and "--itc" not in cmal.flags() and "--mrm" not in cmal.flags()
    assert flag(both.flags(), "--amc") == ["1"] and flag(both.flags(), "--itc") == ["5"]
    token = Unit("cmal", 0, 1e-3, 1.0, recipe="token part")
    assert flag(token.flags(), "--amc_parts") == ["token"]
    assert flag(Unit("cmal", 0, 1e-3, 1.0, recipe="all parts, mask (no swap)").flags(), "--anchor_fill") == ["mask"]
    # names tell every unit of the study apart and read as what they are
    assert cmal.name == "cmal-lr0.001-w1-f1-s0" and token.name == "cmal-lr0.001-w1-token-part-f1-s0"
    assert both.name == "cmal+itc-lr0.001-w1-itc5-f1-s0" and Unit("none", 2).name == "none-s2"
    assert Unit("contrastive", 1, 3e-4, 5.0, recipe="token part").name == "contrastive-lr0.0003-w5-f1-s1"  # no recipe


FLOORS = {"vqa": {"chance": 0.1, "tags": 0.2, "region oracle": 0.9}, "rec": {"chance": 0.2, "tags": 0.4, "region oracle": 0.9}}


def result(unit, vqa, rec, items=None):
    """A unit's result as run_unit writes it; test items of one task all score `items` (default: its score)."""
    scores = {"vqa": vqa, "rec": rec}
    return {"name": unit.name, "validation": scores, "test": scores, "probe": {"unified": {"shape": 1.0, "colour": 0.9, "size": 0.8}},
            "test_items": {task: [scores[task] if items is None else items] * 10 for task in scores}, "seconds": 60.0}  # fmt: skip


def run_plan(study, score):
    """Fill in every unit the study plans, stage by stage, as `score(unit)` = (vqa, rec) says."""
    while todo := [u for u in study.planned() if u.name not in study.results]:
        study.results |= {u.name: result(u, *score(u)) for u in todo}


def test_each_stage_chooses_on_validation_and_the_plan_is_the_whole_study():
    args = objectives.parse_args(["--tasks", "vqa", "rec"])
    study = objectives.Study(args, FLOORS, ["rec"])
    assert len(study.tuning()) == 8 and study.recipes() == [] and study.final_cells().keys() == {"none"}
    assert study.chosen("cmal") is None  # not before the whole grid has run

    def score(unit):
        rec = {"contrastive": 0.5 + (unit.learning_rate == 1e-3) * 0.1, "none": 0.6}.get(unit.arm, 0.6 + (unit.weight == 5.0) * 0.1)
        if unit.recipe == "token part":
            rec += 0.1
        return 0.9 - rec, rec  # VQA runs against REC: the choice is REC's, the mean's only task

    run_plan(study, score)
    assert study.chosen("contrastive") == Unit("contrastive", 0, 1e-3, 1.0)  # ties on weight: the first
    assert study.chosen("cmal") == Unit("cmal", 0, 3e-4, 5.0)
    assert study.recipe() == "token part"
    cells = study.final_cells()
    assert list(cells) == ["none", "contrastive 100%", "CMAL 25%", "CMAL 50%", "CMAL 100%", "CMAL 100%, paper recipe", "CMAL + ITC 100%"]
    assert all([u.seed for u in units] == [0, 1, 2] for units in cells.values())
    assert {u.fraction for u in cells["CMAL 25%"]} == {0.25} and {u.recipe for u in cells["CMAL 25%"]} == {"token part"}
    assert cells["CMAL + ITC 100%"][0] == Unit("cmal+itc", 0, 3e-4, 5.0, "token part", itc=1.0)  # ITC at contrastive's weight
    assert len(study.planned()) == len(study.results) == study.total() == 36


def test_intervals_pair_the_items_and_say_which_way_each_task_falls():
    args = objectives.parse_args(["--tasks", "vqa", "rec", "--seeds", "0", "1"])
    study = objectives.Study(args, FLOORS, ["vqa", "rec"])
    run_plan(study, lambda unit: (0.5, 0.7))
    same = objectives.intervals(study, study.final_cells(), FLOORS, 200)
    assert same["difference"]["vqa"] == (0.0, 0.0, 0.0) and same["CMAL 25%"]["seeds"] == 2
    assert objectives.falls(same["difference"]["rec"]) == "no difference shown"
    # items that differ a lot, CMAL 25% 0.1 above contrastive on each: paired, every resample differs by 0.1
    for cell, shift in (("CMAL 25%", 0.1), ("contrastive 100%", 0.0)):
        for unit in study.final_cells()[cell]:
            study.results[unit.name]["test_items"]["rec"] = [k / 10 + shift for k in range(10)]
    found = objectives.intervals(study, study.final_cells(), FLOORS, 200)
    assert found["CMAL 25%"]["rec"][0] == pytest.approx(0.55) and found["difference"]["rec"] == pytest.approx((0.1, 0.1, 0.1))
    assert found["difference"]["mean gap closed"][0] == pytest.approx(0.1 / 0.5 / 2)  # REC's gap is 0.5 wide; 2 tasks
    assert objectives.falls(found["difference"]["rec"]) == "CMAL 25% ahead"
    assert objectives.falls((-0.1, -0.2, -0.01)) == "contrastive 100% ahead"
    table = objectives.tables(study, {"validation": FLOORS, "test": FLOORS}, found)
    assert "| **CMAL 25% − contrastive 100%** (paired) | | 0.000 [0.000, 0.000] | 0.100 [0.100, 0.100] |" in table
    assert "rec: CMAL 25% ahead" in table and "| floor (no image) | | 0.200 | 0.400 | |" in table


def test_the_mean_is_over_the_tasks_learnability_finds_learnable_measured_once(tmp_path, monkeypatch):
    calls, world, floor_table, trained = [], object(), object(), object()  # the study's own, handed on as they are
    readers = []

    def reader():
        readers.append(1)
        return trained

    def measure(*args):
        calls.append(args)
        return {"vqa": {"learnable": False, "gap_closed": 0.28}, "rec": {"learnable": True, "gap_closed": 0.83}}

    monkeypatch.setattr(objectives.learnability, "measure", measure)
    args = objectives.parse_args(["--output_dir", str(tmp_path), "--finetune_steps", "900"])
    report = objectives.parse_args(["--report", "--output_dir", str(tmp_path)])
    assert objectives.mean_tasks(report, world, floor_table, reader) == (["vqa", "rec"], "learnability not measured yet: every task")
    assert calls == [] and readers == []  # --report runs nothing, trains no reader
    mean_over, why = objectives.mean_tasks(args, world, floor_table, reader)
    assert mean_over == ["rec"] and why.endswith("; left out: vqa (28%)") and "at 900 steps" in why
    (call,) = calls
    assert call[:3] == (world, floor_table, trained) and (call[3].steps, call[3].tasks, call[3].split) == (900, ["vqa", "rec"], "validation")
    assert objectives.mean_tasks(args, world, floor_table, reader) == (mean_over, why) and len(calls) == len(readers) == 1  # kept: a resumed study measures nothing
    named = objectives.parse_args(["--output_dir", str(tmp_path / "other"), "--mean_over", "vqa"])
    assert objectives.mean_tasks(named, world, floor_table, reader) == (["vqa"], "named by --mean_over") and len(calls) == 1


def test_the_floors_are_measured_once_per_world(tmp_path, monkeypatch):
    measured = []
    monkeypatch.setattr(objectives.floors, "floors", lambda world, split, trained: measured.append(split) or {"vqa": {world: split}})
    args = objectives.parse_args(["--output_dir", str(tmp_path)])
    first = objectives.study_floors(args, "one", "key-one", lambda: "reader")
    assert first == {"validation": {"vqa": {"one": "validation"}}, "test": {"vqa": {"one": "test"}}} and len(measured) == 2
    assert objectives.study_floors(args, "one", "key-one", lambda: "reader") == first and len(measured) == 2  # kept
    assert objectives.study_floors(args, "two", "key-two", lambda: "reader")["test"] == {"vqa": {"two": "test"}}  # another world


def test_every_fraction_runs_the_same_steps_and_the_curriculum_covers_the_same_share(tmp_path, monkeypatch):
    from cmal.training import pretrain

    seen = {}

    def fake_pretrain(argv):
        seen[argv[argv.index("--corpus_fraction") + 1]] = argv
        return {"steps": 1234, "final_losses": {}}

    monkeypatch.setattr(pretrain, "main", fake_pretrain)
    monkeypatch.setattr(objectives, "finetune_run", lambda *a, **k: {"eval": {"vqa_accuracy": 0.5}, "test": {"vqa_accuracy": 0.4, "item_scores": [0.4]}})
    monkeypatch.setattr(objectives.region_probe, "probe", lambda *a: {"unified": {}})
    monkeypatch.setattr("cmal.modeling_cmal.CMALModel.from_pretrained", lambda *a, **k: None)
    monkeypatch.setattr("cmal.processors.CMALProcessor.from_pretrained", lambda *a, **k: None)
    monkeypatch.setattr(objectives, "write_json", lambda *a: None)
    args = objectives.parse_args(["--output_dir", str(tmp_path), "--pretrain_steps", "1234", "--tasks", "vqa", "--synthetic_images", "120"])
    for fraction in (0.25, 0.5, 1.0):
        done = objectives.run_unit((Unit("cmal", 0, 1e-3, 1.0, fraction=fraction), args))
        assert done["validation"] == {"vqa": 0.5} and done["test_items"] == {"vqa": [0.4]} and done["pretrain_steps"] == 1234
    curriculum = pretrain.parse_args([]).curriculum_epochs
    for fraction, argv in seen.items():
        assert flag(argv, "--max_train_steps") == ["1234"] and "--num_train_epochs" not in argv
        assert flag(argv, "--curriculum_epochs") == [str(round(curriculum / float(fraction)))]


def test_tiny_study_runs_resumes_and_reports(tmp_path, monkeypatch):
    monkeypatch.setattr(objectives, "LEARNING_RATES", (1e-3,))
    monkeypatch.setattr(objectives, "WEIGHTS", (1.0,))
    monkeypatch.setattr(objectives, "RECIPES", {name: objectives.RECIPES[name] for name in ("all parts", "token part")})
    argv = ["--output_dir", str(tmp_path), "--model_config", "tiny", "--synthetic_images", "120", "--seeds", "0", "1",
            "--fractions", "0.5", "1.0", "--pretrain_steps", "2", "--finetune_steps", "2", "--jobs", "1", "--bootstrap", "50",
            "--mean_over", "vqa", "rec"]  # fmt: skip
    summary = objectives.main(argv)
    names = sorted(r["name"] for r in summary["results"])
    study = objectives.Study(objectives.parse_args(argv), summary["floors"]["validation"], ["vqa", "rec"])
    assert len(names) == study.total() == 2 + 4 - 1 + 2 + 1 + 2 + 2  # tuning, recipes, none, contrastive, CMAL 50%, + ITC
    for r in summary["results"]:
        assert set(r["validation"]) == set(r["test"]) == {"vqa", "rec"} and all(0 <= v <= 1 for v in r["test"].values())
        assert np.mean(r["test_items"]["rec"]) == pytest.approx(r["test"]["rec"]) and set(r["probe"]) == {"chance", "input", "regions", "unified"}
        assert (r["arm"] == "none") == ("pretrain_steps" not in r)
        losses = r.get("pretrain_final_losses", {})
        assert "itm_loss" not in losses and ("itc_loss" in losses) == (r["arm"] in ("contrastive", "cmal+itc"))
        assert ("amc_token_loss" in losses) == (r["arm"] in ("cmal", "cmal+itc") and r["recipe"] in ("all parts", "token part"))
    assert set(summary["intervals"]) >= {"none", "contrastive 100%", "CMAL 50%", "CMAL 100%", "CMAL + ITC 100%"}
    assert not (tmp_path / names[0] / "vqa").exists()  # fine-tuned weights are dropped, the metric kept
    with Image.open(tmp_path / "objectives.png") as image:
        assert image.size[0] > 400
    table = (tmp_path / "table.md").read_text()
    assert table.count("**(chosen)**") == 3 and "**3. The verdict**" in table

    # A second run finds every unit done and redoes none of them, nor the floors.
    logs = {path: os.path.getmtime(path) for path in tmp_path.glob("*/log.txt")}
    monkeypatch.setattr(objectives.floors, "TrainedReader", None)  # a floor measured again would fail
    objectives.main(argv)
    assert {path: os.path.getmtime(path) for path in tmp_path.glob("*/log.txt")} == logs
    assert json.loads((tmp_path / "results.json").read_text())["results"] == summary["results"]
    # --report tabulates what is done, running nothing: here one seed of the contrastive cell has not finished
    undone = study.seeds(Unit("contrastive", 0, 1e-3, 1.0))[1].name
    (tmp_path / undone / "result.json").unlink()
    report = objectives.main([*argv, "--report"])
    assert undone not in {r["name"] for r in report["results"]} and len(report["results"]) == len(names) - 1
    assert not (tmp_path / undone / "result.json").exists() and report["intervals"]["contrastive 100%"]["seeds"] == 1


def test_curves_score_from_scratch_fine_tuning_along_the_way(tmp_path):
    argv = ["--output_dir", str(tmp_path), "--model_config", "tiny", "--synthetic_images", "120", "--curves", "--tasks", "vqa", "rec",
            "--curve_steps", "4", "--curve_every", "2", "--jobs", "1"]  # fmt: skip
    curves = objectives.main(argv)
    assert [c["task"] for c in curves] == ["vqa", "rec"]
    assert all([point["step"] for point in c["curve"]] == [2, 4] for c in curves)
    assert all(0 <= point["score"] <= 1 for c in curves for point in c["curve"])
    assert (tmp_path / "curves.md").read_text().splitlines()[2].startswith("| 2 | ")
    assert not (tmp_path / "curves" / "vqa").exists()
