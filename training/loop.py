"""The training loop of `pretrain.py` and `finetune.py`, with its checkpoints and exact resume.

Checkpoints are `output_dir/checkpoints/step_N` folders of `accelerator.save_state`, written atomically
(`run_folder.save_checkpoint`); `--resume_from_checkpoint latest` continues mid-epoch with the same data order and random state, so a
killed run ends with the weights an uninterrupted run would have had.
"""

import logging
import math
import time

import torch
from tqdm.auto import tqdm

from cmal.training.arguments import TrainingRun
from cmal.training.data.epochs import training_data
from cmal.training.run_folder import check_checkpoint, checkpoint_step, checkpoints, interrupted, save_checkpoint, still_training


logger = logging.getLogger(__name__)


def train(accelerator, run: TrainingRun, model, optimizer, scheduler, dataloader, max_steps: int,
          loss_names=("loss",), description: str = "training", evaluate=None, eval_steps: int = 0) -> dict:  # fmt: skip
    """Run `max_steps` optimizer steps over the prepared `dataloader` of a `TrainingData`, from
    `--resume_from_checkpoint` if given.

    Logs the mean of each of `loss_names` the model returns over the last `--logging_steps` steps (mean
    over micro-batches and processes per step), checkpoints every `--checkpointing_steps`, and stops every
    process on a NaN/inf loss or gradient (`update`). Each epoch is set on the sampler and on the data, whose
    items carry it to the collator (masks and negatives are drawn per (seed, epoch, example)). `evaluate()` (a dict of metrics), when given, runs every `eval_steps` steps and at
    the end: its results make the learning curve, whose last point is the final evaluation. Returns steps,
    steps per epoch, training examples, global batch size, last learning rate, seconds, the share of them spent
    waiting for data, each loss's mean over the first and the last logging window, and the learning curve
    (`[{"step": N, **metrics}]`; evaluation time is not training time).
    """
    steps_per_epoch = math.ceil(len(dataloader) / run.gradient_accumulation_steps)
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    global_batch = run.per_device_train_batch_size * accelerator.num_processes * run.gradient_accumulation_steps
    data = training_data(dataloader)
    examples = data.num_examples()
    logger.info(f"{examples} examples, {steps_per_epoch} steps/epoch, {max_steps} steps, {num_epochs} epochs; "
                f"global batch {global_batch} = {run.per_device_train_batch_size} per device x "
                f"{accelerator.num_processes} processes x {run.gradient_accumulation_steps} accumulation")  # fmt: skip
    completed, start_epoch, skip_batches = resume(accelerator, run, optimizer, scheduler, steps_per_epoch)
    if completed >= max_steps:
        logger.info(f"the checkpoint is at step {completed} of {max_steps}: no step left to train")
        start_epoch = num_epochs

    window = {name: [] for name in loss_names}
    first_losses, pending, data_seconds, curve = None, [], 0.0, []

    def evaluate_at(step: int) -> None:
        # A DataLoader draws its seed from the global RNG: evaluating must not change what training draws next.
        with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
            curve.append({"step": step, **evaluate()})
        accelerator.log({f"eval/{k}": v for k, v in curve[-1].items() if isinstance(v, float)}, step=step)

    with tqdm(total=max_steps, initial=completed, disable=not accelerator.is_local_main_process, desc=description) as progress:
        start = tick = time.perf_counter()
        model.train()
        for epoch in range(start_epoch, num_epochs):
            dataloader.set_epoch(epoch)  # the sampler's order
            data.set_epoch(epoch)  # accelerate's set_epoch skips the data when the sampler has one
            batches = accelerator.skip_first_batches(dataloader, skip_batches) if epoch == start_epoch else dataloader
            for batch in batches:
                batch = data.finish_batch(batch, accelerator.device)  # e.g. the region features, gathered here
                data_seconds += time.perf_counter() - tick
                with accelerator.accumulate(model):
                    outputs = model(**batch)
                    update(accelerator, run, model, optimizer, scheduler, outputs.loss, completed)
                names = [name for name in loss_names if outputs.get(name) is not None]
                pending.append(torch.stack([outputs[name].detach().float() for name in names]))
                if accelerator.sync_gradients:
                    values = accelerator.reduce(torch.stack(pending).mean(0), "mean").tolist()
                    pending = []
                    for name, value in zip(names, values):
                        window[name] = (window[name] + [value])[-run.logging_steps :]
                    completed += 1
                    if interrupted.is_set():
                        raise KeyboardInterrupt
                    progress.update(1)
                    means = {name: sum(v) / len(v) for name, v in window.items() if v}
                    if completed == run.logging_steps:
                        first_losses = means
                    progress.set_postfix({name.replace("_loss", ""): f"{value:.4f}" for name, value in means.items()})
                    if completed % run.logging_steps == 0:
                        accelerator.log({**{f"train/{k}": v for k, v in means.items()}, "train/lr": scheduler.get_last_lr()[0]},
                                        step=completed)  # fmt: skip
                    if evaluate is not None and eval_steps and completed % eval_steps == 0 and completed < max_steps:
                        paused = time.perf_counter()
                        evaluate_at(completed)
                        start += time.perf_counter() - paused
                    if run.checkpointing_steps and completed % run.checkpointing_steps == 0:
                        save_checkpoint(accelerator, run, completed, sum(means.values()) if means else None)
                    if completed >= max_steps:
                        break
                tick = time.perf_counter()
            if completed >= max_steps:
                break
    seconds = time.perf_counter() - start
    if evaluate is not None:
        evaluate_at(completed)
    accelerator.wait_for_everyone()
    return {
        "steps": completed,
        "steps_per_epoch": steps_per_epoch,  # the card's epochs: steps / steps_per_epoch
        "train_examples": examples,
        "global_batch_size": global_batch,
        "last_learning_rate": scheduler.get_last_lr()[0],
        "train_seconds": seconds,
        "data_loading_share": data_seconds / max(seconds, 1e-9),
        "first_losses": first_losses,
        "final_losses": {name: sum(v) / len(v) for name, v in window.items() if v},
        "learning_curve": curve,
    }


def update(accelerator, run: TrainingRun, model, optimizer, scheduler, loss: torch.Tensor, step: int) -> None:
    """Backward, and at the end of an accumulation window the clipped update: never with a non-finite loss or
    gradient norm (`check_finite` stops first), so a NaN never reaches the weights or a checkpoint."""
    check_finite(accelerator, loss, run, step, "loss")
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        norm = accelerator.clip_grad_norm_(model.parameters(), run.max_grad_norm)
        if norm is not None and accelerator.scaler is None:  # fp16's scaler skips non-finite steps itself
            check_finite(accelerator, torch.as_tensor(norm, device=accelerator.device), run, step, "gradient norm")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def resume(accelerator, run: TrainingRun, optimizer, scheduler, steps_per_epoch: int) -> tuple[int, int, int]:
    """Load `--resume_from_checkpoint` (checked by `run_folder.prepare_output_dir`) and apply a changed
    `--learning_rate`; return (completed steps, epoch to start in, batches to skip in it)."""
    path = run.resume_from_checkpoint
    if not path:
        return 0, 0, 0
    if path == "latest":
        found = checkpoints(run.output_dir)
        if not found:
            logger.info("no checkpoint to resume from: starting fresh")
            return 0, 0, 0
        path = found[-1][1]
    check_checkpoint(path, accelerator.process_index)
    accelerator.load_state(path)
    rescale_learning_rate(optimizer, scheduler, run.learning_rate)
    completed = checkpoint_step(path)
    start_epoch, done_in_epoch = divmod(completed, steps_per_epoch)
    skip_batches = done_in_epoch * run.gradient_accumulation_steps
    logger.info(f"resumed from {path}: step {completed}, epoch {start_epoch}, skipping {skip_batches} batches")
    return completed, start_epoch, skip_batches


def rescale_learning_rate(optimizer, scheduler, peak: float) -> None:
    """A resumed schedule keeps its shape and position but peaks at `peak` (`--learning_rate`), so a run
    that diverged can be resumed with a lower rate. Schedules scale their `base_lrs` (LambdaLR and kin)."""
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper
    saved = inner.base_lrs[0]
    if math.isclose(saved, peak, rel_tol=1e-9):
        return
    ratio = peak / saved
    inner.base_lrs = [lr * ratio for lr in inner.base_lrs]
    for group in optimizer.param_groups:
        group["lr"] *= ratio
        group["initial_lr"] = group.get("initial_lr", saved) * ratio
    inner._last_lr = [group["lr"] for group in optimizer.param_groups]
    logger.info(f"--learning_rate {peak:g} differs from the checkpoint's {saved:g}: the resumed schedule is scaled by {ratio:g}")


def check_finite(accelerator, value: torch.Tensor, run: TrainingRun, step: int, what: str) -> None:
    """Stop every process on a NaN/inf loss or gradient norm, before it reaches the weights, so every
    checkpoint holds finite weights; name the newest one."""
    if bool(accelerator.gather(torch.isfinite(value.detach()).reshape(1)).all()):
        return
    last = checkpoints(run.output_dir)
    if last:
        good = still_training(last)
        rising = "" if good == last[-1][1] else f" (the newest, {last[-1][1]}, was saved when the loss had already risen)"
        advice = (f"The last good checkpoint is {good}{rising}: resume from it with a lower --learning_rate (the "
                  "schedule is rescaled), or use bf16 rather than fp16.")  # fmt: skip
    else:
        advice = ("No checkpoint exists to resume from (--checkpointing_steps "
                  f"{'was not set' if not run.checkpointing_steps else f'{run.checkpointing_steps} comes after step {step}'}): "
                  "start over with a lower --learning_rate, or bf16 rather than fp16, and --checkpointing_steps N to "
                  "be able to resume from before a divergence.")  # fmt: skip
    raise RuntimeError(f"The {what} became {value.item()} at step {step}; stopping before the update. {advice}")
