"""What `pretrain.py` and `finetune.py` share: training arguments, atomic checkpoints, resuming,
optimizer groups and the Hub upload. Kept small on purpose: each script stays readable top to bottom.
"""

import json
import logging
import math
import os
import re
import shutil

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed
from transformers import get_scheduler


logger = logging.getLogger(__name__)
CHECKPOINT = re.compile(r"step_(\d+)")


def add_training_args(parser, output_dir: str, batch_size: int, learning_rate: float, epochs: int, warmup: int):
    """The optimisation, checkpointing and tracking flags of both scripts; the defaults differ per script."""
    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", default=output_dir, help="Checkpoints and the final model.")
    train.add_argument("--per_device_train_batch_size", type=int, default=batch_size)
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--learning_rate", type=float, default=learning_rate)
    train.add_argument("--weight_decay", type=float, default=0.01)
    train.add_argument("--max_grad_norm", type=float, default=1.0)
    train.add_argument("--lr_scheduler_type", default="linear", help="Any transformers schedule: linear, cosine, constant...")
    train.add_argument("--num_warmup_steps", type=int, default=warmup)
    train.add_argument("--num_train_epochs", type=int, default=epochs)
    train.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    train.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                       help="Default: what `accelerate config`/`accelerate launch` says, else no.")  # fmt: skip
    train.add_argument("--checkpointing_steps", type=int, default=None, help="Save a resumable state every N steps.")
    train.add_argument("--checkpoints_total_limit", type=int, default=2, help="Keep only the newest N checkpoints.")
    train.add_argument("--resume_from_checkpoint", default=None, help="A checkpoint folder, or 'latest'.")
    train.add_argument("--gradient_checkpointing", action="store_true")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes.")
    train.add_argument("--report_to", default="all", help="tensorboard, wandb, ... ; all = every installed tracker; none.")
    train.add_argument("--logging_steps", type=int, default=10)
    train.add_argument("--push_to_hub", action="store_true", help="Upload the final folder to --hub_model_id.")
    train.add_argument("--hub_model_id", default=None)
    return train


def setup_accelerator(args, find_unused_parameters: bool = False) -> Accelerator:
    """The Accelerator of both scripts (seedable sampler, so a resumed epoch has the same order), logging, seed."""
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if accelerator.is_main_process else logging.WARNING)  # fmt: skip
    set_seed(args.seed)
    return accelerator


def prepare_training(accelerator, args, model, train_dataloader):
    """AdamW and the schedule sized from the data, prepared with the model and the data.

    Returns (model, optimizer, dataloader, scheduler, max_steps, steps_per_epoch after sharding, epochs).
    """
    optimizer = torch.optim.AdamW(optimizer_groups(model, args.weight_decay), lr=args.learning_rate)
    steps_per_epoch = math.ceil(len(train_dataloader) / accelerator.num_processes / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )  # fmt: skip
    model, optimizer, train_dataloader, scheduler = accelerator.prepare(model, optimizer, train_dataloader, scheduler)
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    return model, optimizer, train_dataloader, scheduler, max_steps, steps_per_epoch, math.ceil(max_steps / steps_per_epoch)


def optimizer_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, LayerNorm weights and the hypersphere scales."""
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "scale")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if not n.endswith(no_decay)], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n.endswith(no_decay)], "weight_decay": 0.0},
    ]


def checkpoints(folder: str) -> list[tuple[int, str]]:
    """Complete checkpoints, oldest first; a `.tmp` folder (a save cut short) is never one."""
    root = os.path.join(folder, "checkpoints")
    found = [(int(m.group(1)), os.path.join(root, n)) for n in os.listdir(root) if (m := CHECKPOINT.fullmatch(n))] \
        if os.path.isdir(root) else []  # fmt: skip
    return sorted(found)


def save_checkpoint(accelerator, args, step: int):
    """`save_state` into `step_N.tmp`, then rename: a checkpoint either exists whole or not at all."""
    final = os.path.join(args.output_dir, "checkpoints", f"step_{step}")
    tmp = final + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(tmp, final)
        for _, old in checkpoints(args.output_dir)[: -args.checkpoints_total_limit]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def resume(accelerator, args, steps_per_epoch: int) -> tuple[int, int, int]:
    """Load `--resume_from_checkpoint`; return (completed steps, epoch to start in, batches to skip in it)."""
    path = args.resume_from_checkpoint
    if not path:
        return 0, 0, 0
    if path == "latest":
        found = checkpoints(args.output_dir)
        if not found:
            logger.info("no checkpoint to resume from: starting fresh")
            return 0, 0, 0
        path = found[-1][1]
    name = CHECKPOINT.fullmatch(os.path.basename(os.path.normpath(path)))
    if not os.path.isdir(path) or name is None:
        raise ValueError(f"`--resume_from_checkpoint` must be 'latest' or a checkpoint folder `.../checkpoints/step_N`, got {path!r}")
    accelerator.load_state(path)
    completed = int(name.group(1))
    start_epoch, done_in_epoch = divmod(completed, steps_per_epoch)
    skip_batches = done_in_epoch * args.gradient_accumulation_steps
    logger.info(f"resumed from {path}: step {completed}, epoch {start_epoch}, skipping {skip_batches} batches")
    return completed, start_epoch, skip_batches


def check_finite(accelerator, loss: torch.Tensor, args, step: int) -> None:
    """Stop every process on a NaN/inf loss, naming the last good checkpoint."""
    if bool(accelerator.gather(torch.isfinite(loss.detach()).reshape(1)).all()):
        return
    last = checkpoints(args.output_dir)
    raise RuntimeError(
        f"The loss became {loss.item()} at step {step}; stopping. The last good checkpoint is "
        f"{last[-1][1] if last else 'none (no checkpoint was written yet)'}. Lower --learning_rate, "
        "or use bf16 rather than fp16."
    )


def write_json(path: str, data: dict) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def push_to_hub(args) -> None:
    """Upload the final folder (weights, code, processor, card, results), not the checkpoints or logs."""
    from huggingface_hub import HfApi

    repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=args.output_dir, ignore_patterns=["checkpoints/*", "runs/*"])
