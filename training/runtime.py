"""The machinery a training run starts with, shared by `pretrain.py` and `finetune.py`: the Accelerator (with the
output folder's policy, `run_folder.prepare_output_dir`), CPU threads and logging, DataLoader options, and the
optimizer and schedule prepared with the model and data (`prepare_training`). The folder's layout is
`run_folder.py`'s, a new model's config and processor `model_setup.py`'s, the upload `hub.py`'s.
"""

import functools
import logging
import math
import os
import time

import accelerate
import torch
import transformers
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from transformers import get_scheduler

from cmal.training.arguments import TrainingRun
from cmal.training.data.epochs import training_data
from cmal.training.run_folder import prepare_output_dir


logger = logging.getLogger(__name__)


def trackers(report_to: str) -> str | list | None:
    """`--report_to` as accelerate's `log_with`: "all" is every installed tracker, and none when none is installed (a
    base install: accelerate would warn that `log_with=all` found no tracker)."""
    if report_to == "none":
        return None
    if report_to == "all":
        from accelerate.tracking import get_available_trackers

        return get_available_trackers() or None
    return report_to


def setup_accelerator(run: TrainingRun, find_unused_parameters: bool = False) -> Accelerator:
    """The Accelerator of both scripts (seedable sampler, so a resumed epoch has the same order), logging,
    the output folder (`prepare_output_dir`) and the seed."""
    accelerator = Accelerator(
        # `accelerate launch --multi_gpu` (or training/configs/cpu_2proc.yaml) on a machine without an accelerator:
        # without `cpu=True` each process would train alone, all writing the same folder
        cpu=not accelerator_available(),
        gradient_accumulation_steps=run.gradient_accumulation_steps,
        mixed_precision=run.mixed_precision,
        log_with=trackers(run.report_to),
        # No `automatic_checkpoint_naming`/`total_limit`: `save_state` would then write straight into the
        # final folder (a kill mid-save leaves a complete-looking `checkpoint_N` that "latest" resumes
        # from) and delete the oldest checkpoint before the new one exists. `run_folder.save_checkpoint` writes
        # `step_N.tmp`, renames it, and only then drops the oldest.
        project_config=ProjectConfiguration(project_dir=run.output_dir),
        # non_blocking: batches in pinned memory (`loader_options`) go to the GPU while it still computes
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
    )
    configure_logging(accelerator.is_main_process)
    use_idle_cores(accelerator.device)
    # checkpoints hold each tied weight once, as `save_pretrained` does, without accelerate's "Removed shared tensor"
    accelerator.register_save_state_pre_hook(drop_tied_copies)
    prepare_output_dir(accelerator, run)
    set_seed(run.seed)
    return accelerator


def idle_cores(window: float = 0.5) -> float | None:
    """How many of this process's cores sat idle over the last `window` seconds (Linux's /proc/stat); None elsewhere."""
    def times():
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, all

    try:
        (idle, total), _ = times(), time.sleep(window)
        (idle_after, total_after) = times()
    except (OSError, ValueError, IndexError):
        return None
    machine_cores = os.cpu_count() or 1
    return min(len(os.sched_getaffinity(0)), machine_cores * (idle_after - idle) / max(total_after - total, 1e-9))


def use_idle_cores(device: torch.device) -> int:
    """A CPU run's torch threads (another `device` keeps torch's): as many as the cores other work leaves idle at the
    start, at least one.

    A team of OpenMP threads larger than the idle cores waits on its slowest thread at every op: beside a test
    suite on 2 cores, the world detector's training step took 1.0-3.6 s with 2 threads and 0.3-0.4 s with 1.
    `OMP_NUM_THREADS` decides instead when set; `accelerate launch` always sets it (its `--num_cpu_threads_per_process`,
    1 unless given), so this chooses for scripts run with `python`. A process chooses once: the runs after its first
    (a study's units, a test suite's) keep that choice rather than spend half a second measuring again."""
    if device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        _choose_threads()
    return torch.get_num_threads()


@functools.cache
def _choose_threads() -> None:
    idle = idle_cores()
    if idle is not None:
        torch.set_num_threads(max(1, min(torch.get_num_threads(), round(idle))))
    logger.info(f"{torch.get_num_threads()} CPU threads ({'unknown' if idle is None else f'{idle:.1f}'} cores idle at "
                "the start; OMP_NUM_THREADS=<n> chooses instead)")  # fmt: skip


def configure_logging(main_process: bool = True) -> None:
    """CMAL's own progress at INFO on the main process; every library (accelerate's five lines per checkpoint,
    datasets, transformers) at WARNING, so a run's console shows what the run did and what went wrong.

    transformers' records go through this one handler: its own handler also prints them, and where `CI` is set
    it propagates them to the root too, so a CI console would show every notice twice."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    logging.getLogger("cmal").setLevel(logging.INFO if main_process else logging.WARNING)


def drop_tied_copies(models, weights, output_dir) -> None:
    """`save_state` pre-hook: leave out of each model's state dict the weights it ties to another
    (`_tied_weights_keys`' targets). Loading ties them again (safetensors' `load_model` expects exactly this);
    accelerate would drop them itself, with a warning at every checkpoint."""
    for model, state_dict in zip(models, weights):
        tied = getattr(accelerate.utils.extract_model_from_parallel(model), "_tied_weights_keys", None) or {}
        for key in [key for key in state_dict if key.removeprefix("module.") in tied]:
            del state_dict[key]


def loader_options(num_workers: int) -> dict:
    """DataLoader workers as asked (`--num_workers`), and pinned host memory where a GPU will take the batches
    (copied asynchronously then; pinning on a CPU-only machine would only cost)."""
    return {"num_workers": num_workers, "pin_memory": torch.cuda.is_available()}


def finish(accelerator) -> None:
    """End the run on every process together: a process tearing down its gloo group while another still
    works (the main one saving) could hang in the group's destructor at exit (seen with 2 CPU processes)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()


def accelerator_available() -> bool:
    """A GPU or other accelerator torch can use (`torch.accelerator` from torch 2.6; CUDA before)."""
    return torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()


def prepare_training(accelerator, run: TrainingRun, model, train_dataloader, project_name: str):
    """AdamW and the schedule sized from the data, prepared with the model and the data, and the trackers
    (started only now, so a run that fails while loading leaves no logs in `--output_dir`).

    Returns (model, optimizer, dataloader, scheduler, max_steps).
    """
    if run.report_to != "none":
        accelerator.init_trackers(project_name, {k: v for k, v in run.script_args.items() if isinstance(v, (int, float, str, bool))})
    optimizer = torch.optim.AdamW(optimizer_groups(model, run.weight_decay), lr=run.learning_rate)
    data = training_data(train_dataloader)
    batches = data.batches_per_epoch(train_dataloader)
    steps_per_epoch = math.ceil(batches / accelerator.num_processes / run.gradient_accumulation_steps)
    max_steps = run.max_train_steps or run.num_train_epochs * steps_per_epoch
    scheduler = get_scheduler(
        run.lr_scheduler_type, optimizer, num_warmup_steps=run.num_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )  # fmt: skip
    if data.streamed:  # this process's part already: accelerate must not split it again
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        train_dataloader = prepare_data_loader(train_dataloader, accelerator.device, num_processes=1, process_index=0,
                                               put_on_device=True, dispatch_batches=False,
                                               non_blocking=accelerator.dataloader_config.non_blocking)  # fmt: skip
    else:
        model, optimizer, train_dataloader, scheduler = accelerator.prepare(model, optimizer, train_dataloader, scheduler)
    return model, optimizer, train_dataloader, scheduler, max_steps


def optimizer_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, LayerNorm weights and the hypersphere scales."""
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "scale")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if not n.endswith(no_decay)], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
