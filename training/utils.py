"""What `pretrain.py` and `finetune.py` share besides the training loop (`loop.py`): a new model's config
and processor, training arguments, the Accelerator, optimizer and schedule, and the Hub upload. Kept
small on purpose: each script stays readable top to bottom.
"""

import json
import logging
import math
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from transformers import get_scheduler

from cmal.modeling_cmal import CMAL_PRESETS, CMALConfig
from cmal.processors import AnchorLexicon, CMALImageProcessor, CMALProcessor


logger = logging.getLogger(__name__)


def new_model_config(model_config: str, tokenizer, metadata: dict, **overrides) -> CMALConfig:
    """A preset name or config JSON, fitted to the tokenizer and the region store: a model trained from scratch."""
    base = CMALConfig.from_preset(model_config) if model_config in CMAL_PRESETS else CMALConfig.from_json_file(model_config)
    return CMALConfig.from_dict({
        **base.to_dict(), "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
        "visual_feat_dim": metadata["feature_dim"], "concept_names": list(metadata["concept_names"]), "num_concepts": None,
        **overrides,
    })  # fmt: skip


def new_processor(config: CMALConfig, tokenizer, lexicon: AnchorLexicon | None = None) -> CMALProcessor:
    """The processor of a new model: its concepts and region limits, the tokenizer, and the anchor lexicon
    (default: the concept names themselves)."""
    image_processor = CMALImageProcessor(
        concept_names=config.concept_names, max_regions=config.max_regions, visual_pos_dim=config.visual_pos_dim
    )
    lexicon = lexicon or AnchorLexicon(config.concept_names)
    return CMALProcessor(image_processor, tokenizer, anchor_lexicon=lexicon.to_dict())


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
    train.add_argument("--hub_model_id", default=None, help="Repo id (user/name); default: the output folder's name.")
    train.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repo as private.")
    return train


def setup_accelerator(args, project_name: str, find_unused_parameters: bool = False) -> Accelerator:
    """The Accelerator of both scripts (seedable sampler, so a resumed epoch has the same order), logging,
    seed and trackers."""
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        # No `automatic_checkpoint_naming`/`total_limit`: `save_state` would then write straight into the
        # final folder (a kill mid-save leaves a complete-looking `checkpoint_N` that "latest" resumes
        # from) and delete the oldest checkpoint before the new one exists. `loop.save_checkpoint` writes
        # `step_N.tmp`, renames it, and only then drops the oldest.
        project_config=ProjectConfiguration(project_dir=args.output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if accelerator.is_main_process else logging.WARNING)  # fmt: skip
    set_seed(args.seed)
    if args.report_to != "none":
        accelerator.init_trackers(project_name, {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
    return accelerator


def enable_activation_checkpointing(model) -> None:
    """Recompute activations in the backward pass. transformers renamed `gradient_checkpointing_enable` to
    `activation_checkpointing_enable` (the old name now warns); 5.0, our lower bound, has only the old one."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def prepare_training(accelerator, args, model, train_dataloader):
    """AdamW and the schedule sized from the data, prepared with the model and the data.

    Returns (model, optimizer, dataloader, scheduler, max_steps).
    """
    optimizer = torch.optim.AdamW(optimizer_groups(model, args.weight_decay), lr=args.learning_rate)
    steps_per_epoch = math.ceil(len(train_dataloader) / accelerator.num_processes / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )  # fmt: skip
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


def write_text(path: str, text: str) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def hub_files(folder: str) -> list[str]:
    """The files of `folder` that make its Hub repo, after checking that nothing a user needs is missing.

    A repo loads with `trust_remote_code=True` only if every code file an `auto_map` or `custom_pipelines`
    entry names is there, with the files those import (`from .x import`); it also needs its weights, its
    processor and a model card. Checkpoints, logs and unfinished `.tmp` writes stay behind.
    """
    from transformers.dynamic_module_utils import get_relative_imports

    if not os.path.isdir(folder):
        raise ValueError(f"expected a model folder to upload, got {folder!r} (not a directory)")
    present = sorted(f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f)) and not f.endswith(".tmp"))
    needed = {"config.json": "the model config", "processor_config.json": "the processor", "README.md": "the model card"}
    if "model.safetensors.index.json" in present:
        with open(os.path.join(folder, "model.safetensors.index.json")) as f:
            needed.update({shard: "a weight shard" for shard in json.load(f)["weight_map"].values()})
    else:
        needed["model.safetensors"] = "the weights"
    if "tokenizer.json" not in present and "vocab.txt" not in present:
        needed["tokenizer.json"] = "the tokenizer"
    for config_file in ("config.json", "processor_config.json", "tokenizer_config.json"):
        if config_file not in present:
            continue
        with open(os.path.join(folder, config_file)) as f:
            config = json.load(f)
        references = list((config.get("auto_map") or {}).values())
        references += [p["impl"] for p in (config.get("custom_pipelines") or {}).values()]
        for reference in references:
            reference = reference[0] if isinstance(reference, list) else reference  # tokenizers: [slow, fast]
            if not reference:
                continue
            needed.setdefault(reference.split("--")[-1].rsplit(".", 1)[0] + ".py", f"code named in {config_file}")
    modules = [name for name in needed if name.endswith(".py")]
    for module in modules:  # grows as imports are found
        if module in present:
            for imported in get_relative_imports(os.path.join(folder, module)):
                if imported + ".py" not in needed:
                    needed[imported + ".py"] = f"code imported by {module}"
                    modules.append(imported + ".py")
    missing = [f"{name} ({why})" for name, why in needed.items() if name not in present]
    if missing:
        raise ValueError(f"{folder!r} is not a complete model folder, so it is not uploaded: missing {', '.join(missing)}")
    return present


def push_to_hub(folder: str, repo_id: str | None = None, private: bool | None = None, commit_message: str | None = None):
    """Upload a checked training folder (`hub_files`) in one commit; returns the commit info."""
    from huggingface_hub import CommitOperationAdd, HfApi

    files = hub_files(folder)
    repo_id = repo_id or os.path.basename(os.path.abspath(folder))
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(folder, name)) for name in files]
    info = api.create_commit(repo_id, operations=operations, commit_message=commit_message or f"Upload CMAL from {folder}")
    logger.info(f"uploaded {len(files)} files to {repo_id}: {info.commit_url}")
    return info
