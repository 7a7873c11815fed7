"""The objective study: with a quarter of the corpus, does associative pre-training (CMAL) reach what contrastive
pre-training reaches with all of it, on tasks that need the image?

    python benchmarks/objectives.py                  # the whole study: 2 CPU workers, about 2 hours, resumable
    python benchmarks/objectives.py --report         # the tables of what is done, running nothing
    python benchmarks/objectives.py --curves         # from-scratch learning curves (how the budget was chosen)

Every pre-training runs `--pretrain_steps` at batch 32 whatever its corpus fraction (`--corpus_fraction`: a
smaller share is the same steps over fewer pairs, more epochs; the small-scene curriculum covers the same share of
the steps), no arm has ITM (against the world's contrast twins none learns it: docs/BENCHMARKS.md §2.2), and every
checkpoint is fine-tuned on each of `--tasks` for `--finetune_steps` (batch 32, lr 3e-4, no anchor swaps) and
scored on the validation split and, once, on the test split. Three stages, each chosen on validation:

1. **Tuning.** Each pre-training arm gets the same grid, seed 0: learning rate (`LEARNING_RATES`) x the weight of
   its own loss (`WEIGHTS`: ITC for contrastive, ITC + MLM; AMC for CMAL, AMC + MLM + MRM). Each keeps the
   setting with the highest validation score.
2. **The AMC recipe.** CMAL at its setting with each recipe of `RECIPES` (the three AMC parts together, as the
   paper, each alone, and all three with masking instead of the swap), every seed; the verdict's CMAL runs the
   best on validation. Every pre-trained checkpoint is also probed (`benchmarks/region_probe.py`): do its regions
   still carry shape, colour and size?
3. **The verdict**, on the test split: none (fine-tuned from random weights), contrastive on 100%, CMAL on 25%,
   50% and 100% (its chosen recipe, and the paper's when that differs), CMAL + ITC on 100%; every seed. Each task
   with a 95% interval (bootstrap over seeds and items) and the paired difference CMAL@25% - contrastive@100%.

Each task is read against its floor (the best score without the image) and the region oracle's ceiling
(`benchmarks/floors.py`): gap closed = (score - floor) / (oracle - floor). "Validation score" and the headline
mean gap closed are over the tasks that `benchmarks/learnability.py` finds learnable at `--finetune_steps` on
this world (run once, kept in `<output_dir>/learnability.json`): a task no model of this size learns in the
budget adds only noise. VE, NLVR2 and retrieval are left out of the default `--tasks` for that reason, and to fit
the budget (learnability closes 21% of VE's gap at 1,000 steps, 6% of NLVR2's and -99% of retrieval's at 2,000).

Each unit (a pre-training, its probe and its fine-tunes) is `training/pretrain.py` / `training/finetune.py` run
in-process by one of `--jobs` workers, one CPU thread each, and writes `<output_dir>/<unit>/result.json`
atomically, so a killed study resumes where it stopped; a stage starts when the one it depends on is done (units
that depend on nothing later run beside it). The tables go to `table.md`, the plot to `objectives.png`, every
number to `results.json`.
"""

import argparse
import contextlib
import functools
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context

import floors  # benchmarks/floors.py, beside this script
import learnability
import numpy as np
import region_probe

from cmal.training import tasks
from cmal.training.data.files import write_json, write_text


TASK_NAMES = tuple(tasks.TASKS)
# What the study reads of each task's results, and by what it divides it (recall is in percent).
METRICS = {name: task.item_main_metric for name, task in tasks.TASKS.items()}
LEARNING_RATES = (3e-4, 1e-3)
WEIGHTS = (1.0, 5.0)
# Pre-training flags of each arm on top of pretrain.py's defaults (MLM, MRM, ITM, AMC on; ITC off) and `COMMON`;
# `--learning_rate` and the arm's own weight come from the unit.
ARMS = {
    "contrastive": ["--mrm", "0", "--amc", "0", "--anchor_mask_prob", "0"],
    "cmal": [],
    "cmal+itc": [],
}
OWN_WEIGHT = {"contrastive": "--itc", "cmal": "--amc", "cmal+itc": "--amc"}
COMMON = ["--itm", "0"]
RECIPES = {
    "all parts": [],
    "token part": ["--amc_parts", "token"],
    "region part": ["--amc_parts", "region"],
    "pointer part": ["--amc_parts", "pointer"],
    "all parts, mask (no swap)": ["--anchor_fill", "mask"],
}
PAPER = "all parts"


@dataclass(frozen=True)
class Unit:
    """One pre-training (none for arm "none"), its probe and its fine-tunes."""

    arm: str  # "none" or a key of ARMS
    seed: int
    learning_rate: float = 0.0
    weight: float = 0.0  # the arm's own loss weight (OWN_WEIGHT)
    recipe: str = PAPER  # CMAL's AMC recipe (RECIPES)
    itc: float = 0.0  # cmal+itc: the ITC weight
    fraction: float = 1.0

    @property
    def name(self) -> str:
        if self.arm == "none":
            return f"none-s{self.seed}"
        recipe = "" if self.arm == "contrastive" or self.recipe == PAPER else "-" + "-".join(
            "".join(c if c.isalnum() else " " for c in self.recipe).split())
        itc = f"-itc{self.itc:g}" if self.arm == "cmal+itc" else ""
        return f"{self.arm}-lr{self.learning_rate:g}-w{self.weight:g}{recipe}{itc}-f{self.fraction:g}-s{self.seed}"

    def flags(self) -> list[str]:
        """pretrain.py's flags of this unit beyond the world, the seed, the steps and the fraction."""
        flags = [*COMMON, *ARMS[self.arm], "--learning_rate", f"{self.learning_rate:g}", OWN_WEIGHT[self.arm], f"{self.weight:g}"]
        if self.arm != "contrastive":
            flags += RECIPES[self.recipe]
        return flags + (["--itc", f"{self.itc:g}"] if self.arm == "cmal+itc" else [])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="outputs/objectives")
    p.add_argument("--model_config", default="mini", help="A preset or config JSON (pre-training and from scratch).")
    p.add_argument("--synthetic_images", type=int, default=2000)
    p.add_argument("--tasks", nargs="+", choices=TASK_NAMES, default=["vqa", "rec"],
                   help="Tasks every checkpoint is fine-tuned on (default: the two benchmarks/learnability.py finds "
                        "most learnable at this budget; VE closes 21%% of its gap at 1,000 steps, NLVR2 6%% and "
                        "retrieval -99%% at 2,000).")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pretrain_steps", type=int, default=1000,
                   help="Steps of every pre-training, whatever its corpus fraction (1000: 8 epochs of the default world's corpus).")
    p.add_argument("--finetune_steps", type=int, default=600, help="Fine-tuning steps per task (batch 32).")
    p.add_argument("--finetune_learning_rate", type=float, default=3e-4)
    p.add_argument("--mean_over", nargs="+", choices=TASK_NAMES, metavar="TASK",
                   help="Tasks the mean gap closed is taken over (default: those of --tasks benchmarks/learnability.py "
                        "finds learnable at --finetune_steps on this world).")
    p.add_argument("--bootstrap", type=int, default=2000, help="Bootstrap resamples of the test-split intervals.")
    p.add_argument("--curves", action="store_true",
                   help="Instead of the study: fine-tune from scratch for --curve_steps, scoring every --curve_every.")
    p.add_argument("--curve_steps", type=int, default=2400)
    p.add_argument("--curve_every", type=int, default=200)
    p.add_argument("--report", action="store_true",
                   help="Run nothing: tabulate the units already done (a study still running or cut short).")
    p.add_argument("--jobs", type=int, default=2, help="Worker processes (one CPU thread each).")
    return p.parse_args(argv)


def init_worker():
    import torch

    torch.set_num_threads(1)
    os.environ["TQDM_DISABLE"] = "1"
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    logging.disable(logging.WARNING)


def finetune_run(args, task, init, seed, output, steps, extra=()) -> dict:
    """One `finetune.py` run; its folder is deleted, the results kept."""
    from cmal.training import finetune

    run = finetune.main(["--synthetic_images", str(args.synthetic_images), "--seed", str(seed), "--report_to", "none",
                         "--task", task, *init, "--output_dir", output, "--overwrite_output_dir", "--anchor_mask_prob", "0",
                         "--max_train_steps", str(steps), "--learning_rate", str(args.finetune_learning_rate), *extra])  # fmt: skip
    shutil.rmtree(output)
    return run


def score(task, metrics) -> float:
    metric, scale = METRICS[task]
    return metrics[metric] / scale


def run_unit(job) -> dict:
    """Pre-train (unless arm "none"), probe the regions, fine-tune on each task; keep only the numbers."""
    unit, args = job
    folder = os.path.join(args.output_dir, unit.name)
    result_file = os.path.join(folder, "result.json")
    if os.path.isfile(result_file):
        with open(result_file) as f:
            return json.load(f)
    os.makedirs(folder, exist_ok=True)
    start = time.perf_counter()
    result = {"name": unit.name, **asdict(unit), "validation": {}, "test": {}, "test_items": {}}
    with open(os.path.join(folder, "log.txt"), "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        from cmal.training import pretrain
        from cmal.training.data import synthetic

        world = synthetic.load_world(synthetic.default_world(num_images=args.synthetic_images))
        if unit.arm == "none":
            init = ["--model_config", args.model_config]
            model, processor = region_probe.random_model(world, args.model_config, unit.seed)
        else:
            from cmal.modeling_cmal import CMALModel
            from cmal.processors import CMALProcessor

            pretrained = os.path.join(folder, "pretrained")
            curriculum = round(pretrain.parse_args([]).curriculum_epochs / unit.fraction)
            run = pretrain.main(["--synthetic_images", str(args.synthetic_images), "--seed", str(unit.seed),
                                 "--report_to", "none", "--model_config", args.model_config, "--output_dir", pretrained, "--overwrite_output_dir",
                                 "--max_train_steps", str(args.pretrain_steps), "--corpus_fraction", str(unit.fraction),
                                 "--curriculum_epochs", str(curriculum), *unit.flags()])  # fmt: skip
            result |= {"pretrain_steps": run["steps"], "pretrain_final_losses": run["final_losses"],
                       "pretrain_validation": run.get("validation", {})}  # fmt: skip
            init = ["--model_name_or_path", pretrained]
            model, processor = CMALModel.from_pretrained(pretrained, anchor_mask_prob=0.0), CMALProcessor.from_pretrained(pretrained)
        result["probe"] = region_probe.probe(world, model, processor)
        for task in args.tasks:
            run = finetune_run(args, task, init, unit.seed, os.path.join(folder, task), args.finetune_steps, ["--synthetic_test"])
            result["validation"][task], result["test"][task] = score(task, run["eval"]), score(task, run["test"])
            result["test_items"][task] = run["test"]["item_scores"]
    result["seconds"] = time.perf_counter() - start
    write_json(result_file, result)
    return result


def run_curve(job) -> dict:
    """From-scratch fine-tuning of one task, scored every `--curve_every` steps: where does it converge?"""
    task, args = job
    output = os.path.join(args.output_dir, "curves", task)
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        run = finetune_run(args, task, ["--model_config", args.model_config], 0, output, args.curve_steps,
                           ["--eval_steps", str(args.curve_every)])  # fmt: skip
    return {"task": task, "curve": [{"step": point["step"], "score": score(task, point)} for point in run["learning_curve"]],
            "train_seconds": run["train_seconds"]}  # fmt: skip


def study_floors(args, world, world_key: str, reader) -> dict:
    """The floor tables of the study's world per split (`floors.floors`), measured once and kept in the output
    folder with the world's key (its folder name, a hash of how it was built): a resumed or reported study reads
    them, a study on another world measures its own. `reader()` gives the ceiling's `floors.TrainedReader`."""
    path = os.path.join(args.output_dir, "floors.json")
    if os.path.isfile(path):
        with open(path) as f:
            kept = json.load(f)
        if kept["world"] == world_key:
            return kept["tables"]
    tables = {split: floors.floors(world, split, reader()) for split in ("validation", "test")}
    write_json(path, {"world": world_key, "tables": tables})
    return tables


def mean_tasks(args, world, floor_table, reader) -> tuple[list[str], str]:
    """The tasks the mean gap closed is over, and why: `--mean_over`, else those of `--tasks` that
    `benchmarks/learnability.py` finds learnable at `--finetune_steps` on the study's world (its validation
    `floor_table` and the `floors.TrainedReader` that `reader()` gives), measured once and kept in the output
    folder (`--report` runs nothing: without that file its mean is over every task, and it says so)."""
    if args.mean_over:
        return list(args.mean_over), "named by --mean_over"
    path = os.path.join(args.output_dir, "learnability.json")
    if not os.path.isfile(path):
        if args.report:
            return list(args.tasks), "learnability not measured yet: every task"
        settings = learnability.parse_args(["--steps", str(args.finetune_steps), "--tasks", *args.tasks])
        write_json(path, learnability.measure(world, floor_table, reader(), settings))
    with open(path) as f:
        verdicts = json.load(f)
    learnt = [task for task in args.tasks if verdicts[task]["learnable"]]
    left = ", ".join(f"{task} ({verdicts[task]['gap_closed']:.0%})" for task in args.tasks if task not in learnt)
    why = f"learnable at {args.finetune_steps} steps (benchmarks/learnability.py closes >= {learnability.LEARNABLE:.0%} of the gap)"
    return learnt, why + (f"; left out: {left}" if left else "")


def gap(scores: dict, floor_table: dict, over: list[str]) -> float:
    """Mean gap closed over the tasks `over` of one unit's {task: score}."""
    return float(np.mean([floors.gap_closed(scores[task], floor_table[task]) for task in over])) if over else float("nan")


class Study:
    """The units of each stage, given what is done: the choices of a stage are read from the results of the
    one before it (on validation), so a resumed or reported study makes the same ones."""

    def __init__(self, args, floor_table, mean_over):
        self.args, self.floor_table, self.mean_over = args, floor_table, mean_over
        self.results = {}

    def seeds(self, unit) -> list[Unit]:
        return [replace(unit, seed=seed) for seed in self.args.seeds]

    def tuning(self) -> list[Unit]:
        seed = self.args.seeds[0]
        return [Unit(arm, seed, lr, weight) for arm in ("contrastive", "cmal") for lr in LEARNING_RATES for weight in WEIGHTS]

    def validation_score(self, units) -> float:
        """Mean over seeds of the mean gap closed over the learnable tasks (none learnable: over every task)."""
        done = [self.results[u.name]["validation"] for u in units if u.name in self.results]
        if not done:
            return float("-inf")
        return float(np.mean([gap(s, self.floor_table, self.mean_over or self.args.tasks) for s in done]))

    def chosen(self, arm) -> Unit | None:
        """The arm's tuned setting (seed 0 unit), once every grid point has run."""
        grid = [u for u in self.tuning() if u.arm == arm]
        if any(u.name not in self.results for u in grid):
            return None
        return max(grid, key=lambda u: (self.validation_score([u]), gap(self.results[u.name]["validation"], self.floor_table, self.args.tasks)))

    def recipes(self) -> list[Unit]:
        cmal = self.chosen("cmal")
        return [] if cmal is None else [u for recipe in RECIPES for u in self.seeds(replace(cmal, recipe=recipe))]

    def independent(self) -> list[Unit]:
        """Final cells that need only the tuning: none, and the contrastive arm on 100%."""
        contrastive = self.chosen("contrastive")
        return self.seeds(Unit("none", 0)) + ([] if contrastive is None else self.seeds(contrastive))

    def recipe(self) -> str | None:
        """CMAL's recipe in the verdict: the best on validation once every recipe has every seed."""
        units = self.recipes()
        if not units or any(u.name not in self.results for u in units):
            return None
        return max(RECIPES, key=lambda r: self.validation_score([u for u in units if u.recipe == r]))

    def final_cells(self) -> dict[str, list[Unit]]:
        """The verdict's cells, each its units over the seeds (empty until their stage can be planned)."""
        cmal, contrastive, recipe = self.chosen("cmal"), self.chosen("contrastive"), self.recipe()
        cells = {"none": self.seeds(Unit("none", 0))}
        if contrastive is not None:
            cells["contrastive 100%"] = self.seeds(contrastive)
        if cmal is not None and recipe is not None:
            for fraction in sorted(self.args.fractions):
                cells[f"CMAL {100 * fraction:g}%"] = self.seeds(replace(cmal, recipe=recipe, fraction=fraction))
            if recipe != PAPER:
                cells["CMAL 100%, paper recipe"] = self.seeds(cmal)
            if contrastive is not None:
                cells["CMAL + ITC 100%"] = self.seeds(replace(cmal, arm="cmal+itc", recipe=recipe, itc=contrastive.weight))
        return cells

    def planned(self) -> list[Unit]:
        """Every unit that can be planned now, stage by stage, without repeats."""
        units = self.tuning() + self.independent() + self.recipes() + [u for cell in self.final_cells().values() for u in cell]
        return list({u.name: u for u in units}.values())

    def total(self) -> int:
        """Units of the whole study: the grid, every recipe's seeds (CMAL's tuned seed-0 unit is the paper recipe's),
        none's, the tuned contrastive's other seeds, CMAL's at the fractions below 100% and CMAL + ITC's."""
        seeds, fractions = len(self.args.seeds), len([f for f in self.args.fractions if f != 1.0])
        return len(self.tuning()) + seeds * len(RECIPES) - 1 + seeds + seeds - 1 + seeds * fractions + seeds


def time_left(results, total: int, jobs: int) -> str:
    """The units not done yet at the mean time of those done (each unit's own seconds, resumed ones included),
    over the workers."""
    left = total - len(results)
    return f"about {sum(r['seconds'] for r in results) / len(results) * left / jobs / 60:.0f} min left" if left > 0 else "done"


def mean_std(values) -> str:
    """Mean ± std over the seeds done, and how many: a study cut short has cells of fewer seeds."""
    if not values:
        return "—"
    return f"{values[0]:.3f} (n=1)" if len(values) == 1 else f"{np.mean(values):.3f} ± {np.std(values):.3f} (n={len(values)})"


def replicates(items: np.ndarray, rng, n: int, item_draws: np.ndarray) -> np.ndarray:
    """`n` bootstrap means of a [seeds, items] score matrix: seeds resampled, items as `item_draws` [n, items]
    (shared between the cells a paired difference compares)."""
    seeds = rng.integers(len(items), size=(n, len(items)))
    return items[seeds[:, :, None], item_draws[:, None, :]].mean(axis=(1, 2))


def intervals(study, cells, floor_table, n: int, seed: int = 0) -> dict:
    """Per cell and task (and the mean gap closed over the learnable tasks): the test score over seeds and items,
    its 95% interval, and the paired difference CMAL 25% - contrastive 100% with its interval."""
    rng = np.random.default_rng(seed)
    tasks_ = study.args.tasks
    items = {}
    for name, units in cells.items():
        done = [study.results[u.name] for u in units if u.name in study.results]
        if done:
            items[name] = {task: np.asarray([r["test_items"][task] for r in done]) for task in tasks_}
    sizes = {task: next((m[task].shape[1] for m in items.values()), 0) for task in tasks_}
    draws = {task: rng.integers(size, size=(n, size)) if size else None for task, size in sizes.items()}  # every cell's: paired
    boot = {name: {task: replicates(m[task], rng, n, draws[task]) for task in tasks_} for name, m in items.items()}

    def gap_of(values: dict) -> np.ndarray:
        over = study.mean_over
        if not over:
            return np.full(n, np.nan)
        return np.mean([(values[t] - floors.floor(floor_table[t])) / (floor_table[t]["region oracle"] - floors.floor(floor_table[t]))
                        for t in over], axis=0)  # fmt: skip

    out = {}
    for name, m in items.items():
        point = {task: float(m[task].mean()) for task in tasks_}
        out[name] = {task: (point[task], *np.percentile(boot[name][task], [2.5, 97.5])) for task in tasks_}
        out[name]["mean gap closed"] = (gap(point, floor_table, study.mean_over), *np.percentile(gap_of(boot[name]), [2.5, 97.5]))
        out[name]["seeds"] = len(m[tasks_[0]])
    a, b = "CMAL 25%", "contrastive 100%"
    if a in boot and b in boot:
        diff = {task: boot[a][task] - boot[b][task] for task in tasks_}
        out["difference"] = {task: (out[a][task][0] - out[b][task][0], *np.percentile(diff[task], [2.5, 97.5])) for task in tasks_}
        out["difference"]["mean gap closed"] = (out[a]["mean gap closed"][0] - out[b]["mean gap closed"][0],
                                                *np.percentile(gap_of(boot[a]) - gap_of(boot[b]), [2.5, 97.5]))  # fmt: skip
    return out


def interval(value) -> str:
    return f"{value[0]:.3f} [{value[1]:.3f}, {value[2]:.3f}]"


def falls(difference) -> str:
    low, high = difference[1], difference[2]
    return "CMAL 25% ahead" if low > 0 else "contrastive 100% ahead" if high < 0 else "no difference shown"


def tables(study, floor_tables, intervals_) -> str:
    """Tuning, recipes (with the probe), and the verdict on the test split."""
    args, out, tasks_ = study.args, [], study.args.tasks
    over = ", ".join(study.mean_over) or "no task"
    lines = [f"**1. Tuning** (validation, seed {args.seeds[0]}; chosen: the highest mean gap closed over {over})", "",
             "| arm | learning rate | own weight | " + " | ".join(tasks_) + f" | mean gap closed ({over}) |",
             "|---|---|---|" + "---|" * (len(tasks_) + 1)]  # fmt: skip
    for unit in study.tuning():
        r = study.results.get(unit.name)
        chosen = " **(chosen)**" if study.chosen(unit.arm) == unit else ""
        cells = [f"{r['validation'][t]:.3f}" for t in tasks_] + [f"{gap(r['validation'], floor_tables['validation'], study.mean_over):.3f}"] if r else ["—"] * (len(tasks_) + 1)
        lines.append(f"| {unit.arm}{chosen} | {unit.learning_rate:g} | {OWN_WEIGHT[unit.arm]} {unit.weight:g} | " + " | ".join(cells) + " |")
    out.append("\n".join(lines))

    recipe = study.recipe()
    lines = ["**2. The AMC recipe** (CMAL at its tuned setting, 100% of the corpus, validation, mean ± std over seeds; "
             "probe: the unified encoder's region slots, validation regions)", "",
             "| recipe | " + " | ".join(tasks_) + f" | mean gap closed ({over}) | probe: shape | colour | size |",
             "|---|" + "---|" * (len(tasks_) + 4)]  # fmt: skip
    by_recipe = {name: [u for u in study.recipes() if u.recipe == name] for name in RECIPES}
    rows = [("none (random weights)", study.seeds(Unit("none", 0)))] + list(by_recipe.items())
    if study.chosen("contrastive") is not None:
        rows.insert(1, ("contrastive (ITC + MLM), tuned", study.seeds(study.chosen("contrastive"))))
    for name, units in rows:
        done = [study.results[u.name] for u in units if u.name in study.results]
        per_task = [mean_std([r["validation"][t] for r in done]) for t in tasks_]
        gaps = mean_std([gap(r["validation"], floor_tables["validation"], study.mean_over) for r in done])
        probe = [mean_std([r["probe"]["unified"][a] for r in done]) for a in region_probe.ATTRIBUTES]
        label = f"{name} **(chosen)**" if name == recipe else name
        lines.append(f"| {label} | " + " | ".join([*per_task, gaps, *probe]) + " |")
    out.append("\n".join(lines))

    cells = study.final_cells()
    floor_test = floor_tables["test"]
    lines = ["**3. The verdict** (test split, once; score [95% interval], bootstrap over seeds and items)", "",
             "| pre-training | seeds | " + " | ".join(tasks_) + f" | mean gap closed ({over}) |",
             "|---|---|" + "---|" * (len(tasks_) + 1)]  # fmt: skip
    for name, value in (("chance", lambda t: floor_test[t]["chance"]), ("floor (no image)", lambda t: floors.floor(floor_test[t])),
                        ("region oracle", lambda t: floor_test[t]["region oracle"])):  # fmt: skip
        lines.append(f"| {name} | | " + " | ".join(f"{value(t):.3f}" for t in tasks_) + " | |")
    for name in cells:
        if name in intervals_:
            row = intervals_[name]
            lines.append(f"| {name} | {row['seeds']} | " + " | ".join(interval(row[t]) for t in [*tasks_, "mean gap closed"]) + " |")
        else:
            lines.append(f"| {name} | 0 | " + " | ".join(["—"] * (len(tasks_) + 1)) + " |")
    if "difference" in intervals_:
        diff = intervals_["difference"]
        lines.append("| **CMAL 25% − contrastive 100%** (paired) | | " + " | ".join(interval(diff[t]) for t in [*tasks_, "mean gap closed"]) + " |")
        lines += ["", "Which way each falls: " + "; ".join(f"{t}: {falls(diff[t])}" for t in [*tasks_, "mean gap closed"]) + "."]
    out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def curve_table(curves) -> str:
    steps = [point["step"] for point in curves[0]["curve"]]
    lines = ["| step | " + " | ".join(c["task"] for c in curves) + " |", "|---|" + "---|" * len(curves)]
    for i, step in enumerate(steps):
        lines.append(f"| {step} | " + " | ".join(f"{c['curve'][i]['score']:.3f}" for c in curves) + " |")
    return "\n".join(lines) + "\n"


def plot(study, floor_table, intervals_, path):
    """Test score against the share of pre-training images, per task and for the mean gap closed, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [*study.args.tasks, "mean gap closed"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), dpi=80)
    fractions = sorted(study.args.fractions)
    x = [100 * f for f in fractions]
    for ax, panel in zip(axes, panels):
        cmal = [(x_, intervals_[f"CMAL {x_:g}%"][panel]) for x_ in x if f"CMAL {x_:g}%" in intervals_]
        if cmal:
            at, values = [p for p, _ in cmal], np.array([v for _, v in cmal])
            ax.errorbar(at, values[:, 0], yerr=[values[:, 0] - values[:, 1], values[:, 2] - values[:, 0]], marker="o",
                        capsize=3, label="CMAL")  # fmt: skip
        for name, style in (("contrastive 100%", "s"), ("CMAL + ITC 100%", "^"), ("CMAL 100%, paper recipe", "D")):
            if name in intervals_:
                v = intervals_[name][panel]
                ax.errorbar([100], [v[0]], yerr=[[v[0] - v[1]], [v[2] - v[0]]], marker=style, capsize=3, linestyle="none", label=name)
        if "none" in intervals_:
            v = intervals_["none"][panel]
            ax.axhspan(v[1], v[2], color="gray", alpha=0.2)
            ax.axhline(v[0], color="gray", linestyle="--", label="none (from scratch)")
        if panel != "mean gap closed":
            ax.axhline(floors.floor(floor_table[panel]), color="black", linewidth=0.8, linestyle=":", label="floor (no image)")
        ax.set_title(panel if panel == "mean gap closed" else f"{panel}: {METRICS[panel][0]}")
        ax.set_xlabel("% of pre-training images")
        ax.set_xticks(x)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path)


def run_stage(pool, study, units, start, total):
    """Run the units not done yet (`--report`: only read those done; one job: in this process), printing progress
    and the time left."""
    todo = [u for u in units if u.name not in study.results]
    if study.args.report:
        for unit in todo:
            if os.path.isfile(os.path.join(study.args.output_dir, unit.name, "result.json")):
                study.results[unit.name] = run_unit((unit, study.args))
        return
    for result in (pool.imap_unordered if pool else map)(run_unit, [(unit, study.args) for unit in todo]):
        study.results[result["name"]] = result
        print(f"[{len(study.results)}/{total} {time.perf_counter() - start:.0f} s, "
              f"{time_left(list(study.results.values()), total, study.args.jobs)}] {result['name']}: "
              + ", ".join(f"{t} {result['validation'][t]:.3f}" for t in study.args.tasks), flush=True)  # fmt: skip


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    from cmal.training.data import synthetic

    world_path = synthetic.default_world(num_images=args.synthetic_images)  # built once, before the workers
    world = synthetic.load_world(world_path)
    start = time.perf_counter()
    if args.curves:
        with get_context("spawn").Pool(args.jobs, initializer=init_worker) as pool:
            curves = pool.map(run_curve, [(task, args) for task in args.tasks])
        table = curve_table(curves)
        write_json(os.path.join(args.output_dir, "curves.json"), {"args": vars(args), "curves": curves})
        write_text(os.path.join(args.output_dir, "curves.md"), table)
        print(table + f"from-scratch learning curves in {(time.perf_counter() - start) / 60:.1f} min")
        return curves
    reader = functools.cache(lambda: floors.TrainedReader(world))  # trained only if a table below is not kept yet
    floor_tables = study_floors(args, world, os.path.basename(world_path), reader)
    mean_over, why = mean_tasks(args, world, floor_tables["validation"], reader)
    study = Study(args, floor_tables["validation"], mean_over)
    print(f"mean gap closed over {', '.join(mean_over) or 'no task'} ({why}); {study.total()} units", flush=True)
    pool = None if args.report or args.jobs == 1 else get_context("spawn").Pool(args.jobs, initializer=init_worker)
    with pool or contextlib.nullcontext():
        for stage in (study.tuning, lambda: study.independent() + study.recipes(), study.planned):
            run_stage(pool, study, stage(), start, study.total())
    found = intervals(study, study.final_cells(), floor_tables["test"], args.bootstrap)
    table = tables(study, floor_tables, found)
    plot(study, floor_tables["test"], found, os.path.join(args.output_dir, "objectives.png"))
    wall = sum(r["seconds"] for r in study.results.values()) / args.jobs if args.report else time.perf_counter() - start
    summary = {"args": vars(args), "floors": floor_tables, "mean_over": mean_over, "why": why,
               "chosen": {arm: study.chosen(arm) and study.chosen(arm).name for arm in ("contrastive", "cmal")},
               "recipe": study.recipe(), "intervals": found, "wall_seconds": wall,
               "results": sorted(study.results.values(), key=lambda r: r["name"])}  # fmt: skip
    write_json(os.path.join(args.output_dir, "results.json"), summary)
    write_text(os.path.join(args.output_dir, "table.md"), table)
    print(table)
    how = "(their own times over the workers)" if args.report else "with"
    print(f"{len(study.results)} units in {wall / 60:.1f} min {how} {args.jobs} workers; plot: {args.output_dir}/objectives.png")
    return summary


if __name__ == "__main__":
    main()
