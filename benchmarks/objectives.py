"""The objective study: does associative mapping (CMAL) pre-train better than a contrastive baseline?

    python benchmarks/objectives.py --curves              # first: from-scratch learning curves -> the budgets
    python benchmarks/objectives.py                       # the default grid: 2 CPU workers, many hours
    python benchmarks/objectives.py --seeds 0 --fractions 0.25 1.0 --no_ablations   # a quick look

On the synthetic world, pre-train with
  (a) nothing (fine-tune from random weights),
  (b) contrastive: ITC + MLM, no anchor swaps (the ALBEF-style baseline),
  (c) CMAL: AMC + MLM + MRM,
  (d) CMAL + ITC,
each on 25 / 50 / 100% of the pre-training images (`--corpus_fraction`) for the same `--pretrain_steps`, so a
smaller fraction is a data cut (more epochs over fewer pairs), not a compute cut, and several seeds. No arm has
ITM: against the world's contrast twins no arm's ITM learns at this budget (held-out AUC 0.49-0.55, rules 0.67;
docs/BENCHMARKS.md §2.2), and an objective one arm learns and another does not would be a difference of arms
that is not the one studied; then fine-tune every checkpoint on VQA, VE, NLVR2, REC and retrieval
with each budget of `--finetune_steps` (batch 32, no anchor swaps while fine-tuning; a long budget where
from-scratch fine-tuning has converged, `--curves`, and a short one) and score the validation split.
Each task is read against its floor (the best score without the image) and the region oracle's ceiling
(`benchmarks/floors.py`): gap closed = (accuracy - floor) / (oracle - floor), averaged over those of VQA, VE,
NLVR2 and REC that are learnable at the longest budget (`benchmarks/learnability.py`, run once per study and
kept in `<output_dir>/learnability.json`; `--mean_over` names them instead): a task nothing learns in the budget
adds only noise to a mean. Every task's own column is reported, and retrieval (text->image R@1 over 50 images)
beside them.
Ablations of CMAL at 100%: no hypersphere, masking without the swap (`--anchor_fill mask`), and each AMC
part alone. (a) does not depend on the fraction, so it runs once per seed.

Every run is `training/pretrain.py` / `training/finetune.py` called in-process (`main(argv)`) by one of
`--jobs` worker processes, one CPU thread each. Each pre-training unit (with its fine-tunes) writes
`<output_dir>/<unit>/result.json` atomically, so a killed study resumes where it stopped; units run seed by
seed, ablations last, so a cut-short study has whole seeds. At the end the tables (accuracy and mean gap
closed, mean +- std over seeds, per budget) go to `table.md`, the plot to `objectives.png`, every number
(the floors too) to `results.json`.
"""

import argparse
import contextlib
import json
import logging
import os
import shutil
import time
from multiprocessing import get_context

import floors  # benchmarks/floors.py, beside this script
import learnability
import numpy as np

from cmal.training import tasks
from cmal.training.utils import write_json, write_text


TASKS = ("vqa", "ve", "nlvr2", "rec")  # the mean gap closed is over the learnable ones of these
STUDY_TASKS = (*TASKS, "retrieval")
# What the study reads of each task's validation results, and by what it divides it (recall is in percent).
METRICS = {name: (tasks.TASKS[name].main_metric, 1) for name in TASKS} | {"retrieval": ("text_to_image_r1", 100)}
# The contrastive baseline as tuned on the default world (held-out text->image R@1 of its own pre-training over
# 200 images; chance 0.5%, a reader of the true scenes 68.8%): ITC weight 1 at lr 1e-3 reached 1.6%, weight 5
# 4.7%, weight 1 at lr 3e-4 5.3%, weight 5 at lr 3e-4 19.1%.
CONTRASTIVE = ["--itc", "5", "--mrm", "0", "--amc", "0", "--anchor_mask_prob", "0", "--learning_rate", "3e-4"]
# Every arm's pre-training: no ITM (see the docstring). Each also runs pretrain.py's small-scene curriculum over
# the same share of its steps (`run_unit`: 6 epochs of the full corpus, so 24 epochs of a quarter of it).
COMMON = ["--itm", "0"]
# Pre-training flags of each condition on top of pretrain.py's defaults (MLM, MRM, AMC on; ITC off) and COMMON.
CONDITIONS = {
    "a: none": None,
    "b: contrastive (ITC+MLM)": CONTRASTIVE,
    "c: CMAL (AMC+MLM+MRM)": [],
    "d: CMAL + ITC": ["--itc", "5"],
}
ABLATIONS = {
    "CMAL, no hypersphere": ["--no_hypersphere"],
    "CMAL, mask only (no swap)": ["--anchor_fill", "mask"],
    "CMAL, AMC token part only": ["--amc_parts", "token"],
    "CMAL, AMC region part only": ["--amc_parts", "region"],
    "CMAL, AMC pointer part only": ["--amc_parts", "pointer"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="outputs/objectives")
    p.add_argument("--model_config", default="mini", help="A preset or config JSON (pre-training and from scratch).")
    p.add_argument("--synthetic_images", type=int, default=2000)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pretrain_steps", type=int, default=1500,
                   help="Steps of every pre-training arm, whatever its corpus fraction (1500: 12 epochs of the default "
                        "world's corpus, pretrain.py's default run).")
    p.add_argument("--finetune_steps", type=int, nargs="+", default=[200, 2000],
                   help="Fine-tuning budgets (steps at batch 32), each a run per task: short, and where from-scratch "
                        "fine-tuning has converged on every task (`--curves`: REC last, at about 2000).")
    p.add_argument("--finetune_learning_rate", type=float, default=3e-4)
    p.add_argument("--mean_over", nargs="+", choices=TASKS, metavar="TASK",
                   help="Tasks the mean gap closed is taken over (default: those benchmarks/learnability.py finds "
                        "learnable at the longest --finetune_steps on this world).")
    p.add_argument("--no_ablations", action="store_true")
    p.add_argument("--units", nargs="+", metavar="NAME",
                   help="Run only these units of the grid, in this order (e.g. c-f0.25-s1 b-f1-s1): the cells a "
                        "comparison needs first, when the whole grid does not fit the time at hand.")
    p.add_argument("--curves", action="store_true",
                   help="Instead of the study: fine-tune from scratch for --curve_steps, scoring every --curve_every.")
    p.add_argument("--curve_steps", type=int, default=2400)
    p.add_argument("--curve_every", type=int, default=200)
    p.add_argument("--report", action="store_true",
                   help="Run nothing: tabulate the units already done (a study still running or cut short).")
    p.add_argument("--jobs", type=int, default=2, help="Worker processes (one CPU thread each).")
    return p.parse_args(argv)


def units(args) -> list[dict]:
    """Every pre-training unit: a condition, a corpus fraction and a seed (a: no pre-training); seed by seed,
    then the ablations."""
    out = []
    for seed in args.seeds:
        for name, flags in CONDITIONS.items():
            for fraction in [None] if flags is None else args.fractions:
                out.append(dict(condition=name, flags=flags, fraction=fraction, seed=seed))
    if not args.no_ablations:
        for seed in args.seeds:
            for name, flags in ABLATIONS.items():
                out.append(dict(condition=name, flags=flags, fraction=1.0, seed=seed))
    for unit in out:
        slug = unit["condition"].split(":")[0] if ":" in unit["condition"] else unit["condition"]
        slug = "-".join("".join(c if c.isalnum() else " " for c in slug.lower()).split())
        unit["name"] = f"{slug}-s{unit['seed']}" if unit["fraction"] is None else f"{slug}-f{unit['fraction']:g}-s{unit['seed']}"
    if args.units:
        by_name = {unit["name"]: unit for unit in out}
        unknown = [name for name in args.units if name not in by_name]
        if unknown:
            raise SystemExit(f"--units: {', '.join(unknown)} not in the grid of --seeds/--fractions; its units are: "
                             + " ".join(by_name))  # fmt: skip
        out = [by_name[name] for name in args.units]
    return out


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
    """Pre-train (unless condition a), fine-tune on each task with each budget, keep only the metrics."""
    unit, args = job
    from cmal.training import pretrain

    folder = os.path.join(args.output_dir, unit["name"])
    result_file = os.path.join(folder, "result.json")
    if os.path.isfile(result_file):
        with open(result_file) as f:
            return json.load(f)
    os.makedirs(folder, exist_ok=True)
    start = time.perf_counter()
    result = {key: unit[key] for key in ("name", "condition", "fraction", "seed")} | {"scores": {}}
    with open(os.path.join(folder, "log.txt"), "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        if unit["flags"] is None:
            init = ["--model_config", args.model_config]
        else:
            pretrained = os.path.join(folder, "pretrained")
            curriculum = round(pretrain.parse_args([]).curriculum_epochs / unit["fraction"])
            run = pretrain.main(["--synthetic_images", str(args.synthetic_images), "--seed", str(unit["seed"]),
                                 "--report_to", "none", "--model_config", args.model_config, "--output_dir", pretrained, "--overwrite_output_dir",
                                 "--max_train_steps", str(args.pretrain_steps), "--corpus_fraction", str(unit["fraction"]),
                                 "--curriculum_epochs", str(curriculum), *COMMON, *unit["flags"]])  # fmt: skip
            result |= {"pretrain_steps": run["steps"], "pretrain_final_losses": run["final_losses"],
                       "pretrain_validation": run.get("validation", {})}  # fmt: skip
            init = ["--model_name_or_path", pretrained]
        for steps in args.finetune_steps:
            result["scores"][str(steps)] = {
                task: score(task, finetune_run(args, task, init, unit["seed"], os.path.join(folder, task), steps)["eval"])
                for task in STUDY_TASKS
            }
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


def time_left(results, total: int, jobs: int) -> str:
    """The units not done yet at the mean time of those done (each unit's own seconds, resumed ones included),
    over the workers."""
    left = total - len(results)
    return f"about {sum(r['seconds'] for r in results) / len(results) * left / jobs / 60:.0f} min left" if left else "done"


def mean_std(values) -> str:
    """Mean ± std over the seeds done, and how many: a study cut short has cells of fewer seeds."""
    if not values:
        return "—"
    return f"{values[0]:.3f} (n=1)" if len(values) == 1 else f"{np.mean(values):.3f} ± {np.std(values):.3f} (n={len(values)})"


def runs(results, condition, fraction) -> list[dict]:
    """The results of a condition at a corpus fraction, one per seed (condition a's, whatever the fraction)."""
    return [r for r in results if r["condition"] == condition and r["fraction"] in (fraction, None)]


def cells(results, condition, fraction, task, steps) -> list[float]:
    return [r["scores"][str(steps)][task] for r in runs(results, condition, fraction)]


def gap_closed(results, condition, fraction, floor_table, steps, mean_over) -> list[float]:
    """Per seed, the mean over the tasks `mean_over` of (accuracy - floor) / (region oracle - floor); none
    without such tasks."""
    if not mean_over:
        return []
    return [float(np.mean([floors.gap_closed(r["scores"][str(steps)][task], floor_table[task]) for task in mean_over]))
            for r in runs(results, condition, fraction)]  # fmt: skip


def mean_tasks(args, world, floor_table, trained) -> tuple[list[str], str]:
    """The tasks the mean gap closed is over, and why: `--mean_over`, else the learnable ones by
    `benchmarks/learnability.py` at the longest budget on the study's world (its validation `floor_table` and
    `trained` reader), run once and kept in the output folder (`--report` runs nothing: without that file its
    mean is over every task, and it says so)."""
    if args.mean_over:
        return list(args.mean_over), "named by --mean_over"
    steps, path = max(args.finetune_steps), os.path.join(args.output_dir, "learnability.json")
    if not os.path.isfile(path):
        if args.report:
            return list(TASKS), "learnability not measured yet: every task"
        settings = learnability.parse_args(["--steps", str(steps), "--tasks", *TASKS])
        write_json(path, learnability.measure(world, floor_table, trained, settings))
    with open(path) as f:
        verdicts = json.load(f)
    learnt = [task for task in TASKS if verdicts[task]["learnable"]]
    left = ", ".join(f"{task} ({verdicts[task]['gap_closed']:.0%})" for task in TASKS if task not in learnt)
    why = f"learnable at {steps} steps (benchmarks/learnability.py closes >= {learnability.LEARNABLE:.0%} of the gap)"
    return learnt, why + (f"; left out: {left}" if left else "")


def tables(results, args, floor_table, mean_over, why) -> str:
    """Per budget: accuracy (retrieval: text->image R@1) and the mean gap closed over `mean_over` (chosen for
    `why`); then the ablations at the longest budget."""
    fractions, out = args.fractions, []
    for steps in args.finetune_steps:
        lines = [
            f"**{steps} fine-tuning steps**", "",
            "| pre-training | " + " | ".join(f"{task} @ {100 * f:g}%" for task in STUDY_TASKS for f in fractions) + " |",
            "|---|" + "---|" * (len(STUDY_TASKS) * len(fractions)),
        ]  # fmt: skip
        for name, value in (("chance", lambda row: row["chance"]), ("floor (no image)", floors.floor),
                            ("region oracle", lambda row: row["region oracle"])):  # fmt: skip
            lines.append(f"| {name} | " + " | ".join(f"{value(floor_table[task]):.3f}" for task in STUDY_TASKS for f in fractions) + " |")
        for condition in CONDITIONS:
            row = [mean_std(cells(results, condition, f, task, steps)) for task in STUDY_TASKS for f in fractions]
            lines.append(f"| {condition} | " + " | ".join(row) + " |")
        lines += ["", f"| pre-training: mean gap closed over {', '.join(mean_over) or 'no task'} ({why}) | "
                  + " | ".join(f"{100 * f:g}%" for f in fractions) + " |", "|---|" + "---|" * len(fractions)]  # fmt: skip
        for condition in CONDITIONS:
            gaps = [mean_std(gap_closed(results, condition, f, floor_table, steps, mean_over)) for f in fractions]
            lines.append(f"| {condition} | " + " | ".join(gaps) + " |")
        out.append("\n".join(lines))
    if not args.no_ablations:
        steps = max(args.finetune_steps)
        lines = [f"| ablation (100% corpus, {steps} steps) | " + " | ".join(STUDY_TASKS) + " | mean gap closed |",
                 "|---|" + "---|" * (len(STUDY_TASKS) + 1)]  # fmt: skip
        for condition in ["c: CMAL (AMC+MLM+MRM)", *ABLATIONS]:
            per_task = [mean_std(cells(results, condition, 1.0, task, steps)) for task in STUDY_TASKS]
            lines.append(f"| {condition} | " + " | ".join(per_task) + f" | {mean_std(gap_closed(results, condition, 1.0, floor_table, steps, mean_over))} |")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def curve_table(curves) -> str:
    steps = [point["step"] for point in curves[0]["curve"]]
    lines = ["| step | " + " | ".join(c["task"] for c in curves) + " |", "|---|" + "---|" * len(curves)]
    for i, step in enumerate(steps):
        lines.append(f"| {step} | " + " | ".join(f"{c['curve'][i]['score']:.3f}" for c in curves) + " |")
    return "\n".join(lines) + "\n"


def plot(results, args, floor_table, path):
    """Accuracy against the share of pre-training images, per task, at the longest fine-tuning budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = max(args.finetune_steps)
    fig, axes = plt.subplots(1, len(STUDY_TASKS), figsize=(12, 3.2), dpi=80)
    x = [100 * f for f in args.fractions]
    for ax, task in zip(axes, STUDY_TASKS):
        for condition, flags in CONDITIONS.items():
            done = [(x_, v) for x_, f in zip(x, args.fractions) if (v := cells(results, condition, f, task, steps))]
            at = [x_ for x_, _ in done]
            means, stds = np.array([np.mean(v) for _, v in done]), np.array([np.std(v) for _, v in done])
            if flags is None:  # no pre-training: one level for every fraction
                ax.plot(at, means, "--", color="gray", label=condition)
                ax.fill_between(at, means - stds, means + stds, color="gray", alpha=0.2)
            else:
                ax.errorbar(at, means, yerr=stds, marker="o", capsize=3, label=condition)
        ax.axhline(floors.floor(floor_table[task]), color="black", linewidth=0.8, linestyle=":", label="floor (no image)")
        ax.set_title(f"{task}: {METRICS[task][0]}")
        ax.set_xlabel("% of pre-training images")
        ax.set_xticks(x)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    from cmal.training.data import synthetic

    world = synthetic.load_world(synthetic.default_world(num_images=args.synthetic_images))  # built once, before the workers
    start = time.perf_counter()
    if args.curves:
        with get_context("spawn").Pool(args.jobs, initializer=init_worker) as pool:
            curves = pool.map(run_curve, [(task, args) for task in STUDY_TASKS])
        table = curve_table(curves)
        write_json(os.path.join(args.output_dir, "curves.json"), {"args": vars(args), "curves": curves})
        write_text(os.path.join(args.output_dir, "curves.md"), table)
        print(table + f"from-scratch learning curves in {(time.perf_counter() - start) / 60:.1f} min")
        return curves
    trained = floors.TrainedReader(world)  # the ceiling's reader, and learnability's (`mean_tasks`)
    floor_table = floors.floors(world, "validation", trained)  # the split fine-tuning scores
    todo = units(args)
    results = []
    if args.report:
        todo = [unit for unit in todo if os.path.isfile(os.path.join(args.output_dir, unit["name"], "result.json"))]
        results = [run_unit((unit, args)) for unit in todo]  # each reads its result.json
    else:
        with get_context("spawn").Pool(args.jobs, initializer=init_worker) as pool:
            for result in pool.imap_unordered(run_unit, [(unit, args) for unit in todo]):
                results.append(result)
                last = result["scores"][str(max(args.finetune_steps))]
                print(f"[{len(results)}/{len(todo)} {time.perf_counter() - start:.0f} s, {time_left(results, len(todo), args.jobs)}] "
                      f"{result['name']}: " + ", ".join(f"{task} {last[task]:.3f}" for task in STUDY_TASKS), flush=True)  # fmt: skip
    wall = sum(r["seconds"] for r in results) / args.jobs if args.report else time.perf_counter() - start
    mean_over, why = mean_tasks(args, world, floor_table, trained)
    table = tables(results, args, floor_table, mean_over, why)
    plot(results, args, floor_table, os.path.join(args.output_dir, "objectives.png"))
    summary = {"args": vars(args), "floors": floor_table, "mean_over": mean_over, "wall_seconds": wall, "results": sorted(results, key=lambda r: r["name"])}
    write_json(os.path.join(args.output_dir, "results.json"), summary)
    write_text(os.path.join(args.output_dir, "table.md"), table)
    print(table)
    how = "(their own times over the workers)" if args.report else "with"
    print(f"{len(results)} units in {wall / 60:.1f} min {how} {args.jobs} workers; plot: {args.output_dir}/objectives.png")
    return summary


if __name__ == "__main__":
    main()
