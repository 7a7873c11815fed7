"""The output folder of a training run, and everything that writes, reads or names its layout:

    output_dir/
        config.json, model.safetensors, processor and tokenizer files, README.md, train_results.json, ...
                                the final model (`save_final`), swapped in whole (`final_folder`)
        cmal_run_files.json     what the final save wrote: what a later run may replace (`foreign_files`)
        checkpoints/step_N/     `accelerator.save_state`, written as step_N.tmp and renamed (`save_checkpoint`),
                                with training_loss.json; the newest (`checkpoints`) is what `latest` resumes

The policy for a folder that exists (`prepare_output_dir`), the resume hint printed on Ctrl-C
(`resume_hint_on_interrupt`) and the recovery of a swap a kill cut short (`recover_final_folder`) live here too, so
that one module owns the layout; the loop (`loop.py`) and the scripts only call it. What of the folder goes to the
Hub is `hub.py`'s.
"""

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading

from cmal.training.arguments import TrainingRun
from cmal.training.data.files import write_json


logger = logging.getLogger(__name__)


def prepare_output_dir(accelerator, run: TrainingRun) -> None:
    """The output-folder policy, applied before any data is loaded or any tracker writes.

    A new run needs an absent or empty `--output_dir`; `--resume_from_checkpoint` continues the run that
    is there, and `--overwrite_output_dir` starts over (its checkpoints are deleted now, its model is
    replaced at the end), so `latest` only ever names this run's newest checkpoint. A final save cut
    short by a kill is undone first (`final_folder`).
    """
    folder = run.output_dir
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"--output_dir {folder!r} is a file; expected a folder (absent or empty, or a run to resume)")
    if accelerator.is_main_process:
        recover_final_folder(folder)
    accelerator.wait_for_everyone()
    found = checkpoints(folder)
    stale = []
    foreign = foreign_files(folder) if os.path.isdir(folder) else []
    if foreign and (run.overwrite_output_dir or run.resume_from_checkpoint):
        raise ValueError(f"--output_dir {folder!r} holds {', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}, which no run "
                         "of this package wrote: the run's final save replaces the folder's files, so move them elsewhere "
                         "first (or choose another --output_dir)")  # fmt: skip
    if run.resume_from_checkpoint and run.resume_from_checkpoint != "latest":
        step = checkpoint_step(run.resume_from_checkpoint)
        if step is None or not os.path.isdir(run.resume_from_checkpoint):
            raise ValueError("`--resume_from_checkpoint` must be 'latest' or a checkpoint folder `.../checkpoints/step_N`, "
                             f"got {run.resume_from_checkpoint!r}")  # fmt: skip
        stale = [path for n, path in found if n > step]
    elif not run.resume_from_checkpoint and os.path.isdir(folder) and os.listdir(folder):
        stale = [path for path in [os.path.join(folder, "checkpoints")] if os.path.isdir(path)]
        if not run.overwrite_output_dir:
            if found:
                hint = (f"it holds this run's checkpoints up to step {found[-1][0]}: resume with "
                        f"`{run.command} --resume_from_checkpoint latest`, ")  # fmt: skip
            elif os.path.isfile(os.path.join(folder, "train_results.json")):
                hint = "it holds a finished run (train_results.json): "
            else:
                hint = f"it holds {', '.join(sorted(os.listdir(folder))[:5])}: "
            raise ValueError(f"--output_dir {folder!r} is not empty; {hint}or pass --overwrite_output_dir to start over, "
                             "or choose another --output_dir")  # fmt: skip
    if stale and not run.overwrite_output_dir:
        raise ValueError(f"{', '.join(stale)} are newer than --resume_from_checkpoint {run.resume_from_checkpoint!r}: "
                         "they would outlive the resumed run as its 'latest'. Pass --overwrite_output_dir to delete them, "
                         "or resume from 'latest'")  # fmt: skip
    if stale and accelerator.is_main_process:
        logger.info(f"--overwrite_output_dir: deleting {', '.join(stale)}")
        for path in stale:
            shutil.rmtree(path)
    accelerator.wait_for_everyone()


RUN_FILES = "cmal_run_files.json"  # the files a run's final save wrote: what a later run may replace


def foreign_files(folder: str) -> list[str]:
    """The files of a run folder that no run of this package wrote (a user's notes, a copied config): the files
    the last final save listed in `RUN_FILES` are the run's; sub-folders (checkpoints, tracker logs) are kept by
    every swap. A folder saved before `RUN_FILES` existed counts as the run's when it holds train_results.json."""
    listed = os.path.join(folder, RUN_FILES)
    if os.path.isfile(listed):
        with open(listed) as f:
            owned = set(json.load(f)) | {RUN_FILES}
    elif os.path.isfile(os.path.join(folder, "train_results.json")):
        return []
    else:
        owned = set()
    return sorted(name for name in os.listdir(folder) if os.path.isfile(os.path.join(folder, name)) and name not in owned)


CHECKPOINT = re.compile(r"step_(\d+)")


def checkpoints(folder: str) -> list[tuple[int, str]]:
    """Complete checkpoints, oldest first; a `.tmp` folder (a save cut short) is never one."""
    root = os.path.join(folder, "checkpoints")
    found = [(int(m.group(1)), os.path.join(root, n)) for n in os.listdir(root) if (m := CHECKPOINT.fullmatch(n))] \
        if os.path.isdir(root) else []  # fmt: skip
    return sorted(found)


def checkpoint_step(path: str) -> int | None:
    """N of a `.../step_N` checkpoint folder's name; None for any other name."""
    name = CHECKPOINT.fullmatch(os.path.basename(os.path.normpath(path)))
    return int(name.group(1)) if name else None


def one_file_mode(folder: str) -> None:
    """Give the files of `folder` the mode a plain write gets (0666 less the umask): saves that go through a
    temporary file (safetensors' model.safetensors) leave 0600, unreadable to a group that reads the rest."""
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(folder):
        if os.path.isfile(os.path.join(folder, name)):
            os.chmod(os.path.join(folder, name), 0o666 & ~umask)


TRAINING_LOSS = "training_loss.json"  # in a checkpoint: the loss it was saved at, which the NaN guard reads


def save_checkpoint(accelerator, run: TrainingRun, step: int, loss: float | None = None):
    """`save_state` into `step_N.tmp`, then rename: a checkpoint either exists whole or not at all. Only
    then are all but the newest `--checkpoints_total_limit` removed, the last one saved before the loss rose kept
    (`still_training`; why not Accelerate's `total_limit`: `runtime.setup_accelerator`). `loss`, the sum of the logged
    losses' means over the last logging window, is kept in it."""
    final = os.path.join(run.output_dir, "checkpoints", f"step_{step}")
    tmp = final + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if loss is not None:
            write_json(os.path.join(tmp, TRAINING_LOSS), {"step": step, "loss": loss})
        one_file_mode(tmp)
        shutil.rmtree(final, ignore_errors=True)  # a step retrained after resuming from an earlier checkpoint
        os.replace(tmp, final)
        found = checkpoints(run.output_dir)
        good = still_training(found)  # a diverging run's last good checkpoint outlives the limit
        for _, old in found[: -run.checkpoints_total_limit]:
            if old != good:
                shutil.rmtree(old)
        logger.info(f"step {step}: checkpoint saved to {final}")
    accelerator.wait_for_everyone()


def still_training(found: list[tuple[int, str]], rise: float = 1.5) -> str:
    """The newest of the checkpoints `found` saved before the loss rose: its recorded loss within `rise` times the
    lowest any of them recorded. A run diverges over many steps before its loss is NaN, so the newest checkpoint
    can hold finite weights that no longer train (the newest when none recorded a loss)."""
    losses = {}
    for _, path in found:
        if os.path.isfile(os.path.join(path, TRAINING_LOSS)):
            with open(os.path.join(path, TRAINING_LOSS)) as f:
                losses[path] = json.load(f)["loss"]
    if not losses:
        return found[-1][1]
    lowest = min(losses.values())
    return next(path for _, path in reversed(found) if path in losses and losses[path] <= rise * lowest)


# What `accelerator.save_state` writes for this loop (one model, optimizer and scheduler; FSDP writes folders)
CHECKPOINT_PARTS = {"weights": ("model.safetensors", "pytorch_model.bin", "pytorch_model_fsdp_0"),
                    "optimizer state": ("optimizer.bin", "optimizer_0"), "scheduler state": ("scheduler.bin",)}  # fmt: skip


def check_checkpoint(path: str, process_index: int) -> None:
    """A checkpoint resumes exactly or not at all: each part `save_state` writes is there, and this process's
    random state reads (accelerate would log the failure at INFO and go on with another data order)."""
    from accelerate.utils import load

    present = set(os.listdir(path))
    missing = [part for part, names in CHECKPOINT_PARTS.items() if not present & set(names)]
    rng = f"random_states_{process_index}.pkl"
    if rng not in present:
        missing.append(f"random state ({rng})")
    if missing:
        raise ValueError(f"the checkpoint {path} is incomplete: it lacks its {', '.join(missing)}; resume from another "
                         "checkpoint (--resume_from_checkpoint .../checkpoints/step_N) or start over")  # fmt: skip
    try:
        load(os.path.join(path, rng))["torch_manual_seed"]
    except Exception as error:
        raise ValueError(f"the checkpoint {path}: its random state {rng} cannot be read ({type(error).__name__}: "
                         f"{str(error)[:100]}), so the resumed run would draw other batches and masks than the "
                         "uninterrupted one; resume from another checkpoint or start over") from None


@contextlib.contextmanager
def final_folder(folder: str):
    """Yield a temporary sibling of `folder` to write the final model into; on success it takes `folder`'s
    place, keeping the run's sub-folders (checkpoints, tracker logs) and dropping the previous model's files.

    A kill mid-save leaves the previous complete folder (or none) beside a `.tmp` folder; a kill between the
    two renames leaves a `.old` one that `recover_final_folder` moves back at the next start.
    """
    folder = os.path.abspath(folder)
    staging = os.path.join(folder + ".tmp", os.path.basename(folder))  # same name: the card names the model after it
    shutil.rmtree(folder + ".tmp", ignore_errors=True)
    os.makedirs(staging)
    yield staging
    written = sorted(os.listdir(staging))
    one_file_mode(staging)
    write_json(os.path.join(staging, RUN_FILES), written)
    if os.path.isdir(folder):
        os.replace(folder, folder + ".old")
    os.replace(staging, folder)
    recover_final_folder(folder)


@contextlib.contextmanager
def save_final(accelerator, model, state_dict: dict, processor, run: TrainingRun, results: dict):
    """The model, processor and `train_results.json` written into a `final_folder`, which is yielded for
    the script's own files (card, evaluation) before it takes `--output_dir`'s place.

    `state_dict` is `accelerator.get_state_dict(model)`, taken on every process (under FSDP it gathers the
    shards into full tensors on the main one); this runs on the main process only.
    """
    with final_folder(run.output_dir) as folder:
        accelerator.unwrap_model(model).save_pretrained(folder, state_dict=state_dict, save_function=accelerator.save)
        processor.save_pretrained(folder)
        write_json(os.path.join(folder, "train_results.json"), {**results, "args": run.script_args})
        measured = carried_detector_results(run) if accelerator.unwrap_model(model).config.detector_config else None
        if measured:
            write_json(os.path.join(folder, DETECTOR_RESULTS), measured)
        yield folder


DETECTOR_RESULTS = "detector_results.json"  # the carried detector's own eval_results.json, which the card quotes


def carried_detector_results(run: TrainingRun) -> dict | None:
    """What the detector the model carries measured when it was trained: its folder's `eval_results.json`
    (`--detector`), or the `detector_results.json` of the local checkpoint fine-tuning started from. None when
    neither exists (a Hub detector, or one trained elsewhere): the card then quotes no detector metric."""
    sources = [(run.script_args.get("detector"), "eval_results.json"), (run.script_args.get("model_name_or_path"), DETECTOR_RESULTS)]
    for folder, name in sources:
        if folder and os.path.isfile(os.path.join(folder, name)):
            with open(os.path.join(folder, name)) as f:
                return json.load(f)
    return None


def recover_final_folder(folder: str) -> None:
    """Finish or undo a `final_folder` swap that a kill cut short; drop an unfinished staging folder."""
    folder = os.path.abspath(folder)
    old = folder + ".old"
    shutil.rmtree(folder + ".tmp", ignore_errors=True)
    if not os.path.isdir(old):
        return
    if not os.path.isdir(folder):
        os.replace(old, folder)
        return
    for name in os.listdir(old):
        if os.path.isdir(os.path.join(old, name)) and not os.path.exists(os.path.join(folder, name)):
            os.replace(os.path.join(old, name), os.path.join(folder, name))
    shutil.rmtree(old)


# Set by `resume_hint_on_interrupt`'s handler: a KeyboardInterrupt raised while Python runs a finalizer
# (a generator closed at an epoch's end, a `__del__`) is printed and dropped, so the loop raises it again at
# the next step instead of training on to the end.
interrupted = threading.Event()


@contextlib.contextmanager
def resume_hint_on_interrupt(run: TrainingRun, accelerator):
    """Ctrl-C (or a scheduler's SIGTERM) ends the run with one line saying how to resume, not ~90 lines of
    tracebacks; the exit status is 130 as for any interrupted program."""

    def stop(signum, frame):
        interrupted.set()  # in case this KeyboardInterrupt lands in a finalizer, which drops it
        raise KeyboardInterrupt

    interrupted.clear()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except KeyboardInterrupt:
        if accelerator.is_main_process:
            found = checkpoints(run.output_dir)
            if found:
                resume = run.command.replace(" --overwrite_output_dir", "")
                if "--resume_from_checkpoint" not in resume:
                    resume += " --resume_from_checkpoint latest"
                print(f"\ninterrupted; step {found[-1][0]} is saved in {found[-1][1]}: resume with `{resume}`", file=sys.stderr)
            else:
                print(f"\ninterrupted before any checkpoint was saved (set --checkpointing_steps to make runs resumable); "
                      f"start over with `{run.command} --overwrite_output_dir`", file=sys.stderr)  # fmt: skip
        raise SystemExit(130) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
