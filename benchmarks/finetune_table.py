"""Pre-trained vs from-scratch fine-tuning on the synthetic world, every task, one table.

    python benchmarks/finetune_table.py                      # pre-trains first if --pretrained is missing
    python benchmarks/finetune_table.py --tasks vqa rec --num_train_epochs 2   # other flags go to finetune.py

Each fine-tuning run is `accelerate launch training/finetune.py --task T [--model_name_or_path P]` with
finetune.py's default recipe, `TASK_FLAGS` and the extra flags given here, the same for both starts. The table gives the main
validation metric of each and chance: the metric of uniformly random predictions (mean of 20 draws) and,
for VQA, of always answering the most frequent training answer. Runs go two at a time (one CPU thread
each); results land in `--output_dir/<task>-<start>/eval_results.json`; the table is printed and saved.
"""

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cmal.training.data import synthetic
from cmal.training.data.downstream import TaskExamples
from cmal.training.tasks import TASKS


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(script_args: list[str], log: str) -> None:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_cpu_threads_per_process", "1",
               os.path.join(ROOT, "training", script_args[0]), *script_args[1:], "--report_to", "none", "--overwrite_output_dir"]  # fmt: skip
    with open(log, "w") as f:
        subprocess.run(command, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1"})


def chance(task, world: dict, draws: int = 20, retrieval_images: int = 50) -> dict:
    """The main metric of the task's chance baselines on the validation split (`task.chance_predictions`:
    uniformly random predictions, mean of `draws`; for VQA also the majority answer)."""
    rng = np.random.default_rng(0)
    table = task.synthetic_data(world)
    id2label = dict(enumerate(task.label_names(table["train"], 1)))
    evaluation_set, references = task.evaluation_set(TaskExamples(task, table["validation"], world["regions"]), retrieval_images)
    values = {}
    for _ in range(draws):
        for name, predictions in task.chance_predictions(rng, evaluation_set, id2label).items():
            values.setdefault(name, []).append(task.score(predictions, references, id2label)[task.main_metric])
    return {name: float(np.mean(v)) for name, v in values.items()}


# Per-task flags on top of finetune.py's defaults, the same for both starts. Retrieval's ITM head learns
# from a pre-trained encoder at 1e-4 but stays at chance at the default 3e-4 (measured: rsum 299 vs 74).
TASK_FLAGS = {"retrieval": ["--learning_rate", "1e-4"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--pretrained", default="outputs/cmal-mini-synthetic", help="Made with `pretrain.py` defaults if missing.")
    p.add_argument("--output_dir", default="outputs/finetune-table")
    p.add_argument("--parallel", type=int, default=2)
    args, extra = p.parse_known_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    if not os.path.isfile(os.path.join(args.pretrained, "config.json")):
        launch(["pretrain.py", "--output_dir", args.pretrained], os.path.join(args.output_dir, "pretrain.log"))

    runs = [(task, start) for task in args.tasks for start in ("pretrained", "scratch")]

    def run(task_start):
        task, start = task_start
        folder = os.path.join(args.output_dir, f"{task}-{start}")
        init = ["--model_name_or_path", args.pretrained] if start == "pretrained" else []
        launch(["finetune.py", "--task", task, *init, "--output_dir", folder, *TASK_FLAGS.get(task, []), *extra], folder + ".log")
        with open(os.path.join(folder, "eval_results.json")) as f:
            evaluation = json.load(f)
        with open(os.path.join(folder, "train_results.json")) as f:
            return task_start, {**evaluation, "steps": json.load(f)["steps"]}

    with ThreadPoolExecutor(args.parallel) as pool:
        results = dict(pool.map(run, runs))
    world = synthetic.load_world(synthetic.default_world())
    flags = " ".join(extra)
    lines = ["| task | metric | chance | from scratch | pre-trained (CMAL) | steps |", "|---|---|---|---|---|---|"]
    for task in args.tasks:
        main_metric = TASKS[task].main_metric
        c = chance(TASKS[task], world)
        chance_text = f"{c['random']:.3f}" + (f" (majority {c['majority']:.3f})" if "majority" in c else "")
        scratch, pretrained = results[(task, "scratch")][main_metric], results[(task, "pretrained")][main_metric]
        steps = results[(task, "pretrained")]["steps"]
        lines.append(f"| {task} | {main_metric} | {chance_text} | {scratch:.3f} | {pretrained:.3f} | {steps} |")
    per_task = "; ".join(f"{task}: `{' '.join(f)}`" for task, f in TASK_FLAGS.items() if task in args.tasks)
    table = "\n".join(lines) + (f"\n\nfine-tuning: `accelerate launch training/finetune.py --task <task> "
                                 f"[--model_name_or_path {args.pretrained}] {flags}`" + (f" ({per_task})" if per_task else "") + "\n")  # fmt: skip
    with open(os.path.join(args.output_dir, "table.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
