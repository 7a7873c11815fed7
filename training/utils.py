"""What `pretrain.py` and `finetune.py` share besides the training loop (`loop.py`): a new model's config
and processor, training arguments, the Accelerator, optimizer and schedule, and the Hub upload. Kept
small on purpose: each script stays readable top to bottom.
"""

import contextlib
import difflib
import functools
import inspect
import json
import logging
import math
import os
import shutil
import signal
import sys
import time

import accelerate
import torch
import transformers
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from transformers import get_scheduler

from cmal.modeling_cmal import CMAL_PRESETS, CMALConfig
from cmal.processors import AnchorLexicon, CMALImageProcessor, CMALProcessor
from cmal.training import loop
from cmal.training.files import write_json
from cmal.training.loop import checkpoint_step, checkpoints, one_file_mode


logger = logging.getLogger(__name__)


def config_from_file(path: str) -> CMALConfig:
    """A `--model_config` JSON file; a field CMALConfig does not know is refused (transformers would keep it as
    an attribute nobody reads, and train the defaults), with the nearest known names."""
    try:
        with open(path) as f:
            fields = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--model_config {path}: not a JSON file ({error})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"--model_config {path}: expected a JSON object of config fields, got {type(fields).__name__}")
    known = set(CMALConfig().to_dict()) | {"auto_map", "custom_pipelines"}  # the last two: what save_pretrained adds
    unknown = sorted(set(fields) - known)
    if unknown:
        near = {name: difflib.get_close_matches(name, known, n=1) for name in unknown}
        hints = ", ".join(f"{name!r}" + (f" (did you mean {near[name][0]!r}?)" if near[name] else "") for name in unknown)
        raise ValueError(f"--model_config {path}: unknown config fields {hints}; CMALConfig's fields: "
                         f"{', '.join(sorted(inspect.signature(CMALConfig.__init__).parameters.keys() - {'self', 'kwargs'}))}")  # fmt: skip
    return CMALConfig.from_dict(fields)


def new_model_config(model_config: str, tokenizer, metadata: dict, **overrides) -> CMALConfig:
    """A preset name or config JSON, fitted to the tokenizer and the region store: a model trained from scratch."""
    base = CMALConfig.from_preset(model_config) if model_config in CMAL_PRESETS else config_from_file(model_config)
    return CMALConfig.from_dict({
        **base.to_dict(), "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
        "visual_feat_dim": metadata["feature_dim"], "concept_names": list(metadata["concept_names"]), "num_concepts": None,
        **overrides,
    })  # fmt: skip


def new_processor(config: CMALConfig, tokenizer, lexicon: AnchorLexicon | None = None, detector: str | None = None) -> CMALProcessor:
    """The processor of a new model: its concepts and region limits, the tokenizer, and the anchor lexicon
    (default: the concept names themselves); with a `detector` folder, that detector's own image preprocessing."""
    limits = dict(concept_names=config.concept_names, max_regions=config.max_regions, visual_pos_dim=config.visual_pos_dim)
    if detector is None:
        image_processor = CMALImageProcessor(**limits)
    else:
        from transformers import AutoImageProcessor

        image_processor = CMALImageProcessor.from_detector_processor(AutoImageProcessor.from_pretrained(detector), **limits)
    lexicon = lexicon or AnchorLexicon(config.concept_names)
    return CMALProcessor(image_processor, tokenizer, anchor_lexicon=lexicon.to_dict())


def trackers(report_to: str) -> str | list | None:
    """`--report_to` as accelerate's `log_with`: "all" is every installed tracker, and none when none is installed (a
    base install: accelerate would warn that `log_with=all` found no tracker)."""
    if report_to == "none":
        return None
    if report_to == "all":
        from accelerate.tracking import get_available_trackers

        return get_available_trackers() or None
    return report_to


def setup_accelerator(args, find_unused_parameters: bool = False) -> Accelerator:
    """The Accelerator of both scripts (seedable sampler, so a resumed epoch has the same order), logging,
    the output folder (`prepare_output_dir`) and the seed."""
    accelerator = Accelerator(
        # `accelerate launch --multi_gpu` (or training/configs/cpu_2proc.yaml) on a machine without an accelerator:
        # without `cpu=True` each process would train alone, all writing the same folder
        cpu=not accelerator_available(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=trackers(args.report_to),
        # No `automatic_checkpoint_naming`/`total_limit`: `save_state` would then write straight into the
        # final folder (a kill mid-save leaves a complete-looking `checkpoint_N` that "latest" resumes
        # from) and delete the oldest checkpoint before the new one exists. `loop.save_checkpoint` writes
        # `step_N.tmp`, renames it, and only then drops the oldest.
        project_config=ProjectConfiguration(project_dir=args.output_dir),
        # non_blocking: batches in pinned memory (`loader_options`) go to the GPU while it still computes
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
    )
    configure_logging(accelerator.is_main_process)
    use_idle_cores(accelerator.device)
    # checkpoints hold each tied weight once, as `save_pretrained` does, without accelerate's "Removed shared tensor"
    accelerator.register_save_state_pre_hook(drop_tied_copies)
    prepare_output_dir(accelerator, args)
    set_seed(args.seed)
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


def loader_options(args) -> dict:
    """DataLoader workers as asked, and pinned host memory where a GPU will take the batches (copied
    asynchronously then; pinning on a CPU-only machine would only cost)."""
    return {"num_workers": args.num_workers, "pin_memory": torch.cuda.is_available()}


def prepare_output_dir(accelerator, args) -> None:
    """The output-folder policy, applied before any data is loaded or any tracker writes.

    A new run needs an absent or empty `--output_dir`; `--resume_from_checkpoint` continues the run that
    is there, and `--overwrite_output_dir` starts over (its checkpoints are deleted now, its model is
    replaced at the end), so `latest` only ever names this run's newest checkpoint. A final save cut
    short by a kill is undone first (`final_folder`).
    """
    folder = args.output_dir
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"--output_dir {folder!r} is a file; expected a folder (absent or empty, or a run to resume)")
    if accelerator.is_main_process:
        recover_final_folder(folder)
    accelerator.wait_for_everyone()
    found = checkpoints(folder)
    stale = []
    foreign = foreign_files(folder) if os.path.isdir(folder) else []
    if foreign and (args.overwrite_output_dir or args.resume_from_checkpoint):
        raise ValueError(f"--output_dir {folder!r} holds {', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}, which no run "
                         "of this package wrote: the run's final save replaces the folder's files, so move them elsewhere "
                         "first (or choose another --output_dir)")  # fmt: skip
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest":
        step = checkpoint_step(args.resume_from_checkpoint)
        if step is None or not os.path.isdir(args.resume_from_checkpoint):
            raise ValueError("`--resume_from_checkpoint` must be 'latest' or a checkpoint folder `.../checkpoints/step_N`, "
                             f"got {args.resume_from_checkpoint!r}")  # fmt: skip
        stale = [path for n, path in found if n > step]
    elif not args.resume_from_checkpoint and os.path.isdir(folder) and os.listdir(folder):
        stale = [path for path in [os.path.join(folder, "checkpoints")] if os.path.isdir(path)]
        if not args.overwrite_output_dir:
            if found:
                hint = (f"it holds this run's checkpoints up to step {found[-1][0]}: resume with "
                        f"`{args.command} --resume_from_checkpoint latest`, ")  # fmt: skip
            elif os.path.isfile(os.path.join(folder, "train_results.json")):
                hint = "it holds a finished run (train_results.json): "
            else:
                hint = f"it holds {', '.join(sorted(os.listdir(folder))[:5])}: "
            raise ValueError(f"--output_dir {folder!r} is not empty; {hint}or pass --overwrite_output_dir to start over, "
                             "or choose another --output_dir")  # fmt: skip
    if stale and not args.overwrite_output_dir:
        raise ValueError(f"{', '.join(stale)} are newer than --resume_from_checkpoint {args.resume_from_checkpoint!r}: "
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
def save_final(accelerator, model, state_dict: dict, processor, args, results: dict):
    """The model, processor and `train_results.json` written into a `final_folder`, which is yielded for
    the script's own files (card, evaluation) before it takes `--output_dir`'s place.

    `state_dict` is `accelerator.get_state_dict(model)`, taken on every process (under FSDP it gathers the
    shards into full tensors on the main one); this runs on the main process only.
    """
    with final_folder(args.output_dir) as folder:
        accelerator.unwrap_model(model).save_pretrained(folder, state_dict=state_dict, save_function=accelerator.save)
        processor.save_pretrained(folder)
        write_json(os.path.join(folder, "train_results.json"), {**results, "args": vars(args)})
        measured = carried_detector_results(args) if accelerator.unwrap_model(model).config.detector_config else None
        if measured:
            write_json(os.path.join(folder, DETECTOR_RESULTS), measured)
        yield folder


DETECTOR_RESULTS = "detector_results.json"  # the carried detector's own eval_results.json, which the card quotes


def carried_detector_results(args) -> dict | None:
    """What the detector the model carries measured when it was trained: its folder's `eval_results.json`
    (`--detector`), or the `detector_results.json` of the local checkpoint fine-tuning started from. None when
    neither exists (a Hub detector, or one trained elsewhere): the card then quotes no detector metric."""
    sources = [(getattr(args, "detector", None), "eval_results.json"), (getattr(args, "model_name_or_path", None), DETECTOR_RESULTS)]
    for folder, name in sources:
        if folder and os.path.isfile(os.path.join(folder, name)):
            with open(os.path.join(folder, name)) as f:
                return json.load(f)
    return None


def finish(accelerator) -> None:
    """End the run on every process together: a process tearing down its gloo group while another still
    works (the main one saving) could hang in the group's destructor at exit (seen with 2 CPU processes)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()


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


@contextlib.contextmanager
def resume_hint_on_interrupt(args, accelerator):
    """Ctrl-C (or a scheduler's SIGTERM) ends the run with one line saying how to resume, not ~90 lines of
    tracebacks; the exit status is 130 as for any interrupted program."""

    def stop(signum, frame):
        loop.interrupted.set()  # in case this KeyboardInterrupt lands in a finalizer, which drops it
        raise KeyboardInterrupt

    loop.interrupted.clear()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except KeyboardInterrupt:
        if accelerator.is_main_process:
            found = checkpoints(args.output_dir)
            if found:
                resume = args.command.replace(" --overwrite_output_dir", "")
                if "--resume_from_checkpoint" not in resume:
                    resume += " --resume_from_checkpoint latest"
                print(f"\ninterrupted; step {found[-1][0]} is saved in {found[-1][1]}: resume with `{resume}`", file=sys.stderr)
            else:
                print(f"\ninterrupted before any checkpoint was saved (set --checkpointing_steps to make runs resumable); "
                      f"start over with `{args.command} --overwrite_output_dir`", file=sys.stderr)  # fmt: skip
        raise SystemExit(130) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def accelerator_available() -> bool:
    """A GPU or other accelerator torch can use (`torch.accelerator` from torch 2.6; CUDA before)."""
    return torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()


def enable_activation_checkpointing(model) -> None:
    """Recompute activations in the backward pass. transformers renamed `gradient_checkpointing_enable` to
    `activation_checkpointing_enable` (the old name now warns); 5.0, our lower bound, has only the old one."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def apply_compute_flags(model, args) -> None:
    """`--gradient_checkpointing` and `--padding_free`: how the model computes, not what (both scripts)."""
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if args.padding_free:
        model.config.padding_free = True  # saved with the model: its users' padded batches run packed too


def prepare_training(accelerator, args, model, train_dataloader, project_name: str):
    """AdamW and the schedule sized from the data, prepared with the model and the data, and the trackers
    (started only now, so a run that fails while loading leaves no logs in `--output_dir`).

    Returns (model, optimizer, dataloader, scheduler, max_steps).
    """
    if args.report_to != "none":
        accelerator.init_trackers(project_name, {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
    optimizer = torch.optim.AdamW(optimizer_groups(model, args.weight_decay), lr=args.learning_rate)
    # a stream (`StreamingPairs`) is this process's part already: accelerate must not split it again
    stream = getattr(train_dataloader.dataset, "batches_all_processes", None)
    batches = stream() if stream else len(train_dataloader)
    steps_per_epoch = math.ceil(batches / accelerator.num_processes / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )  # fmt: skip
    if stream:
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


# What a model repo may hold besides the weights and code: configs, processor and tokenizer files, the card,
# the run's results and the Inference Endpoint handler. Nothing else is ever uploaded.
HUB_FILES = {
    "config.json", "generation_config.json", "processor_config.json", "preprocessor_config.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt", "README.md",
    "train_results.json", "eval_results.json", DETECTOR_RESULTS, "handler.py", "requirements.txt",
}  # fmt: skip


def hub_files(folder: str) -> list[str]:
    """The files of `folder` that make its Hub repo: an allowlist, after checking nothing a user needs is missing.

    Uploaded: the weights (checked to be whole safetensors files, every shard the index names with
    exactly its tensors), `HUB_FILES`, and the code files an `auto_map` or `custom_pipelines` entry
    names with the files those import (`from .x import`): a repo loads with `trust_remote_code=True`
    only if all are there. Never uploaded: anything else (dotfiles, logs, checkpoints, unfinished
    `.tmp` writes), symlinks, and anything resolving outside the folder. Raises `ValueError` naming
    each missing or broken file.
    """
    from transformers.dynamic_module_utils import get_relative_imports

    if not os.path.isdir(folder):
        raise ValueError(f"expected a model folder to upload, got {folder!r} (not a directory)")
    root = os.path.realpath(folder)
    present = {name for name in os.listdir(folder) if os.path.isfile(os.path.join(folder, name))}
    needed = {"config.json": "the model config", "processor_config.json": "the processor", "README.md": "the model card"}
    if "model.safetensors.index.json" in present:
        weights = shard_map(os.path.join(folder, "model.safetensors.index.json"))
        needed |= {"model.safetensors.index.json": "the shard index"} | {shard: "a weight shard" for shard in weights}
    else:
        weights = {"model.safetensors": None}
        needed["model.safetensors"] = "the weights"
    if "tokenizer.json" not in present and "vocab.txt" not in present:
        needed["tokenizer.json"] = "the tokenizer"
    for config_file in ("config.json", "processor_config.json", "tokenizer_config.json"):
        if config_file in present:
            for module in code_files(os.path.join(folder, config_file)):
                needed.setdefault(module, f"code named in {config_file}")
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
    selected = sorted(name for name in present if name in needed or name in HUB_FILES)
    for name in selected:
        path = os.path.join(folder, name)
        if os.path.islink(path) or os.path.dirname(os.path.realpath(path)) != root:
            raise ValueError(f"{path} is a link (to {os.path.realpath(path)}): only files inside the folder are uploaded; "
                             "copy the file in")  # fmt: skip
    for name, keys in weights.items():
        check_safetensors(os.path.join(folder, name), keys)
    return selected


def code_files(config_path: str) -> list[str]:
    """The `.py` files a config's `auto_map` and `custom_pipelines` entries name."""
    with open(config_path) as f:
        config = json.load(f)
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    references = list((config.get("auto_map") or {}).values())
    references += [p["impl"] for p in (config.get("custom_pipelines") or {}).values()]
    references = [r[0] if isinstance(r, list) else r for r in references]  # tokenizers: [slow, fast]
    return [r.split("--")[-1].rsplit(".", 1)[0] + ".py" for r in references if r]


def shard_map(index_path: str) -> dict[str, set]:
    """{shard file: the tensor names the index puts in it} of a `model.safetensors.index.json`."""
    with open(index_path) as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path}: expected a non-empty `weight_map` object")
    shards = {}
    for tensor, shard in weight_map.items():
        if os.path.basename(shard) != shard:
            raise ValueError(f"{index_path}: shard {shard!r} of {tensor!r} is not a file name in the folder")
        shards.setdefault(shard, set()).add(tensor)
    return shards


def check_safetensors(path: str, keys: set | None = None) -> None:
    """A whole safetensors file (header and data; a cut-short write fails here) holding exactly `keys`."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            stored = set(f.keys())
    except SafetensorError as error:
        raise ValueError(f"{path} is not a complete safetensors file ({error}), so it is not uploaded") from None
    if keys is not None and stored != keys:
        raise ValueError(f"{path} holds {len(stored)} tensors but the shard index names {len(keys)} for it "
                         f"(e.g. {sorted(stored ^ keys)[:3]}): the shards and their index disagree")  # fmt: skip


def push_to_hub(folder: str, repo_id: str | None = None, private: bool | None = None, commit_message: str | None = None):
    """Upload a checked training folder (`hub_files`) in one commit; returns the commit info.

    A card the training scripts wrote (the folder has `train_results.json`) is first rendered again for the
    repo as the Hub names it (`owner/name`, also when `repo_id` was given without the owner), so that its
    snippets load this very repo."""
    from huggingface_hub import CommitOperationAdd, HfApi

    from cmal.model_cards.render import render_folder

    files = hub_files(folder)
    repo_id = repo_id or os.path.basename(os.path.abspath(folder))
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if os.path.isfile(os.path.join(folder, "train_results.json")):
        render_folder(folder, repo_id=repo_id)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(folder, name)) for name in files]
    info = api.create_commit(repo_id, operations=operations, commit_message=commit_message or f"Upload CMAL from {folder}")
    logger.info(f"uploaded {len(files)} files to {repo_id}: {info.commit_url}")
    return info
