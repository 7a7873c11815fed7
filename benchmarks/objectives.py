"""The objective study: does associative mapping (CMAL) pre-train better than a contrastive baseline?

    python benchmarks/objectives.py                       # the default grid: 2 CPU workers, several hours
    python benchmarks/objectives.py --seeds 0 --fractions 0.25 1.0 --no_ablations   # a quick look
    python benchmarks/objectives.py --model_config small --finetune_steps 600        # bigger

On the synthetic world, pre-train with
  (a) nothing (fine-tune from random weights),
  (b) contrastive: ITC + ITM + MLM, no anchor swaps (the CMCL-style baseline),
  (c) CMAL: AMC + ITM + MLM + MRM,
  (d) CMAL + ITC,
each on 25 / 50 / 100% of the pre-training images (`--corpus_fraction`: the same epochs, so less data is
also less compute) and several seeds; then fine-tune every checkpoint on VQA, VE, NLVR2 and REC with the
same budget (`--finetune_steps` at batch 32, no anchor swaps while fine-tuning) and score the validation
split. Each task is read against its floor (the best score without the image) and the region oracle's
ceiling (`benchmarks/floors.py`): gap closed = (accuracy - floor) / (oracle - floor), averaged over tasks.
Ablations of CMAL at 100%: no hypersphere, masking without the swap (`--anchor_fill mask`), and each AMC
part alone. (a) does not depend on the fraction, so it runs once per seed.

Every run is `training/pretrain.py` / `training/finetune.py` called in-process (`main(argv)`) by one of
`--jobs` worker processes, one CPU thread each. Each pre-training unit (with its fine-tunes) writes
`<output_dir>/<unit>/result.json` atomically, so a killed study resumes where it stopped. At the end
the tables (accuracy and mean gap closed, mean ± std over seeds) go to `table.md`, the plot to
`objectives.png`, every number (the floors too) to `results.json`.
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
import numpy as np

from cmal.training import tasks


TASKS = ("vqa", "ve", "nlvr2", "rec")  # the tasks with floors and a ceiling (benchmarks/floors.py)
# Pre-training flags of each condition on top of pretrain.py's defaults (MLM, MRM, ITM, AMC on; ITC off).
CONDITIONS = {
    "a: none": None,
    "b: contrastive (ITC+ITM+MLM)": ["--itc", "1", "--mrm", "0", "--amc", "0", "--anchor_mask_prob", "0"],
    "c: CMAL (AMC+ITM+MLM+MRM)": [],
    "d: CMAL + ITC": ["--itc", "1"],
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
    p.add_argument("--pretrain_epochs", type=int, default=12,
                   help="Epochs over the (fraction of the) corpus; the first 6 are pretrain.py's small-scene curriculum.")
    p.add_argument("--finetune_steps", type=int, default=200, help="Fine-tuning steps per task (batch 32).")
    p.add_argument("--finetune_learning_rate", type=float, default=3e-4)
    p.add_argument("--no_ablations", action="store_true")
    p.add_argument("--jobs", type=int, default=2, help="Worker processes (one CPU thread each).")
    return p.parse_args(argv)


def units(args) -> list[dict]:
    """Every pre-training unit: a condition, a corpus fraction and a seed (a: no pre-training)."""
    out = []
    for seed in args.seeds:
        for name, flags in CONDITIONS.items():
            for fraction in [None] if flags is None else args.fractions:
                out.append(dict(condition=name, flags=flags, fraction=fraction, seed=seed))
        if not args.no_ablations:
            for name, flags in ABLATIONS.items():
                out.append(dict(condition=name, flags=flags, fraction=1.0, seed=seed))
    for unit in out:
        slug = unit["condition"].split(":")[0] if ":" in unit["condition"] else unit["condition"]
        slug = "".join(c if c.isalnum() else "-" for c in slug.lower()).strip("-")
        unit["name"] = f"{slug}-s{unit['seed']}" if unit["fraction"] is None else f"{slug}-f{unit['fraction']:g}-s{unit['seed']}"
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


def run_unit(job) -> dict:
    """Pre-train (unless condition a), fine-tune on each task, keep only the metrics."""
    unit, args = job
    from cmal.training import finetune, pretrain

    folder = os.path.join(args.output_dir, unit["name"])
    result_file = os.path.join(folder, "result.json")
    if os.path.isfile(result_file):
        with open(result_file) as f:
            return json.load(f)
    os.makedirs(folder, exist_ok=True)
    common = ["--synthetic_images", str(args.synthetic_images), "--seed", str(unit["seed"]), "--report_to", "none"]
    start = time.perf_counter()
    result = {key: unit[key] for key in ("name", "condition", "fraction", "seed")}
    with open(os.path.join(folder, "log.txt"), "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        if unit["flags"] is None:
            init = ["--model_config", args.model_config]
        else:
            pretrained = os.path.join(folder, "pretrained")
            losses = pretrain.main([*common, "--model_config", args.model_config, "--output_dir", pretrained,
                                    "--num_train_epochs", str(args.pretrain_epochs),
                                    "--corpus_fraction", str(unit["fraction"]), *unit["flags"]])  # fmt: skip
            result["pretrain_steps"] = losses["steps"]
            result["pretrain_final_losses"] = losses["final_losses"]
            init = ["--model_name_or_path", pretrained]
        for task in TASKS:
            output = os.path.join(folder, task)
            run = finetune.main([*common, "--task", task, *init, "--output_dir", output, "--anchor_mask_prob", "0",
                                 "--max_train_steps", str(args.finetune_steps),
                                 "--learning_rate", str(args.finetune_learning_rate)])  # fmt: skip
            result[task] = run["eval"][tasks.TASKS[task].main_metric]
            shutil.rmtree(output)  # the metric is all the study needs
    result["seconds"] = time.perf_counter() - start
    with open(result_file + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(result_file + ".tmp", result_file)
    return result


def mean_std(values) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "—"


def runs(results, condition, fraction) -> list[dict]:
    """The results of a condition at a corpus fraction, one per seed (condition a's, whatever the fraction)."""
    return [r for r in results if r["condition"] == condition and r["fraction"] in (fraction, None)]


def cells(results, condition, fraction, task) -> list[float]:
    return [r[task] for r in runs(results, condition, fraction)]


def gap_closed(results, condition, fraction, floor_table) -> list[float]:
    """Per seed, the mean over tasks of (accuracy - floor) / (region oracle - floor)."""
    return [float(np.mean([floors.gap_closed(r[task], floor_table[task]) for task in TASKS]))
            for r in runs(results, condition, fraction)]  # fmt: skip


def tables(results, args, floor_table) -> str:
    fractions = args.fractions
    lines = [
        "| pre-training | " + " | ".join(f"{task} @ {100 * f:g}%" for task in TASKS for f in fractions) + " |",
        "|---|" + "---|" * (len(TASKS) * len(fractions)),
        "| chance | " + " | ".join(f"{floor_table[task]['chance']:.3f}" for task in TASKS for f in fractions) + " |",
        "| floor (no image) | " + " | ".join(f"{floors.floor(floor_table[task]):.3f}" for task in TASKS for f in fractions) + " |",
        "| region oracle | " + " | ".join(f"{floor_table[task]['region oracle']:.3f}" for task in TASKS for f in fractions) + " |",
    ]
    for condition in CONDITIONS:
        row = [mean_std(cells(results, condition, f, task)) for task in TASKS for f in fractions]
        lines.append(f"| {condition} | " + " | ".join(row) + " |")
    lines += ["", "| pre-training: mean gap closed over " + ", ".join(TASKS) + " | "
              + " | ".join(f"{100 * f:g}%" for f in fractions) + " |", "|---|" + "---|" * len(fractions)]  # fmt: skip
    for condition in CONDITIONS:
        lines.append(f"| {condition} | " + " | ".join(mean_std(gap_closed(results, condition, f, floor_table)) for f in fractions) + " |")
    if not args.no_ablations:
        lines += ["", "| ablation (100% corpus) | " + " | ".join(TASKS) + " | mean of tasks |", "|---|" + "---|" * (len(TASKS) + 1)]
        for condition in ["c: CMAL (AMC+ITM+MLM+MRM)", *ABLATIONS]:
            per_task = [cells(results, condition, 1.0, task) for task in TASKS]
            average = list(np.mean(per_task, axis=0)) if all(per_task) else []
            lines.append(f"| {condition} | " + " | ".join(mean_std(v) for v in per_task) + f" | {mean_std(average)} |")
    return "\n".join(lines) + "\n"


def plot(results, args, chance, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(10, 3.2), dpi=80)
    x = [100 * f for f in args.fractions]
    for ax, task in zip(axes, TASKS):
        for condition, flags in CONDITIONS.items():
            values = [cells(results, condition, f, task) for f in args.fractions]
            means, stds = np.array([np.mean(v) for v in values]), np.array([np.std(v) for v in values])
            if flags is None:  # no pre-training: one level for every fraction
                ax.plot(x, means, "--", color="gray", label=condition)
                ax.fill_between(x, means - stds, means + stds, color="gray", alpha=0.2)
            else:
                ax.errorbar(x, means, yerr=stds, marker="o", capsize=3, label=condition)
        ax.axhline(chance[task], color="black", linewidth=0.8, linestyle=":", label="chance")
        ax.set_title(f"{task}: {tasks.TASKS[task].main_metric}")
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
    floor_table = floors.floors(world, "validation")  # the split fine-tuning scores
    chance = {task: floor_table[task]["chance"] for task in TASKS}
    todo = units(args)
    start = time.perf_counter()
    results = []
    with get_context("spawn").Pool(args.jobs, initializer=init_worker) as pool:
        for result in pool.imap_unordered(run_unit, [(unit, args) for unit in todo]):
            results.append(result)
            print(f"[{len(results)}/{len(todo)} {time.perf_counter() - start:.0f} s] {result['name']}: "
                  + ", ".join(f"{task} {result[task]:.3f}" for task in TASKS), flush=True)  # fmt: skip
    wall = time.perf_counter() - start
    table = tables(results, args, floor_table)
    plot(results, args, chance, os.path.join(args.output_dir, "objectives.png"))
    summary = {"args": vars(args), "floors": floor_table, "wall_seconds": wall, "results": sorted(results, key=lambda r: r["name"])}
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(args.output_dir, "table.md"), "w") as f:
        f.write(table)
    print(table)
    print(f"{len(results)} units in {wall / 60:.1f} min with {args.jobs} workers; plot: {args.output_dir}/objectives.png")


if __name__ == "__main__":
    main()
