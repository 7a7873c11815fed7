"""The scripts' command-line arguments: value checks (argparse `type`s), the training flags they share, and
`TrainingRun`, the typed record of those flags that the training loop and the run's machinery take.

Nothing here imports torch, transformers or datasets (a check that needs one imports it when it runs), so a
script builds its parser and answers `--help` or a usage error at once, before loading the libraries.
"""

import argparse
import dataclasses
import importlib
import math
import os
import shlex
import sys


# `CMAL_PRESETS`' names (tests/test_packaging.py keeps the two equal): the presets themselves load transformers.
PRESET_NAMES = ("tiny", "mini", "small", "base")
# The parts of the associative mapping loss: CMALConfig's `amc_<part>_weight` fields (`pretrain.py --amc_parts`).
AMC_PARTS = ("token", "region", "pointer")


def bounded(kind: type, low: float, high: float | None = None, low_open: bool = False):
    """An argparse `type` that refuses values outside [low, high] (or (low, high]) with the range in the message."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or (high is not None and value > high):
            interval = f"{'(' if low_open else '['}{low}, {'inf)' if high is None else f'{high}]'}"
            raise argparse.ArgumentTypeError(f"expected a value in {interval}, got {text!r}")
        return value

    return parse


POSITIVE_INT, NON_NEGATIVE_INT = bounded(int, 1), bounded(int, 0)
POSITIVE, NON_NEGATIVE, PROBABILITY = bounded(float, 0, low_open=True), bounded(float, 0), bounded(float, 0, 1)


def existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text!r}" + (" (a folder)" if os.path.isdir(text) else ""))
    return text


def existing_folder(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"no such folder: {text!r}" + (" (a file)" if os.path.isfile(text) else ""))
    return text


# First parts of a path that name this package's (or any training script's) local output, never a Hub user:
# `outputs/cmal-vqa` in a fresh clone, before the run that makes it, is a typo or a missing run, not a repo id.
LOCAL_ROOTS = ("outputs", "output", "runs", "checkpoints", "models", "data", "logs", "tmp")


def model_source(text: str) -> str:
    """A local folder or a Hub repo id. What can only be a path (it starts with `.`, `/` or `~`, has more than
    one `/`, its first part is a local folder, as in `outputs/cmal-smal`, or one of `LOCAL_ROOTS`) fails at once
    with "no such folder" rather than after minutes of Hub retries and a message about some config file."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.isdir(text):
        return text
    if os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such folder: {text!r} is a file; expected a folder holding config.json "
                                         "and the weights (what save_pretrained writes), or a Hub repo id")  # fmt: skip
    first = text.split("/")[0]
    try:
        validate_repo_id(text)
        is_repo_id = not text.startswith((".", "~")) and not os.path.isdir(first or "/") and ("/" not in text or first not in LOCAL_ROOTS)
    except HFValidationError:
        is_repo_id = False
    if not is_repo_id:
        raise argparse.ArgumentTypeError(f"no such folder: {text!r} (a local path, so not a Hub repo id)")
    return hub_model(text)


def hub_model(repo_id: str) -> str:
    """A Hub repo id that can be loaded: offline (`HF_HUB_OFFLINE`, `TRANSFORMERS_OFFLINE`), one in the local cache;
    online, one that one Hub request finds. Either way a typo is "no such folder" now, not the retries and a message
    about some config file that loading would give."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        if not any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in ("config.json", "tokenizer_config.json")):
            raise argparse.ArgumentTypeError(f"no such folder: {repo_id!r}, and as a Hub repo id it is not in the local cache "
                                             "while the Hub is offline (HF_HUB_OFFLINE)")  # fmt: skip
        return repo_id
    try:
        found = HfApi().repo_exists(repo_id)
    except Exception as error:  # no network, a proxy, a timeout: one try, then say so
        raise argparse.ArgumentTypeError(f"no such folder: {repo_id!r}, and the Hub could not be asked whether it is a repo "
                                         f"({type(error).__name__}); check the path or the connection") from None  # fmt: skip
    if not found:
        raise argparse.ArgumentTypeError(f"no such folder: {repo_id!r}, and no Hub repo has that id (a private one needs "
                                         "`hf auth login`)")  # fmt: skip
    return repo_id


def model_config_source(text: str) -> str:
    if text in PRESET_NAMES or os.path.isfile(text):
        return text
    raise argparse.ArgumentTypeError(f"expected a preset ({', '.join(PRESET_NAMES)}) or a config JSON file, "
                                     f"got {text!r} (no such file)")  # fmt: skip


def lr_schedule(text: str) -> str:
    """A transformers schedule name (checked against `SchedulerType` once parsing, not `--help`, needs it)."""
    from transformers import SchedulerType

    names = [schedule.value for schedule in SchedulerType]
    if text not in names:
        raise argparse.ArgumentTypeError(f"expected a transformers schedule ({', '.join(names)}), got {text!r}")
    return text


def add_training_args(parser, output_dir: str, batch_size: int, learning_rate: float, epochs: int, warmup: int,
                      cmal_model: bool = True):
    """The optimisation, checkpointing and tracking flags of the training scripts; the defaults differ per script.
    `cmal_model`: also the flags of a CMAL checkpoint (how it computes, its upload), which the detector has not."""
    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", default=output_dir,
                       help="Checkpoints and the final model. Must be empty or absent unless resuming or --overwrite_output_dir.")  # fmt: skip
    train.add_argument("--overwrite_output_dir", action="store_true",
                       help="Start over in a non-empty --output_dir: its checkpoints are deleted, its model replaced at the end.")  # fmt: skip
    train.add_argument("--per_device_train_batch_size", type=POSITIVE_INT, default=batch_size)
    train.add_argument("--gradient_accumulation_steps", type=POSITIVE_INT, default=1)
    train.add_argument("--learning_rate", type=POSITIVE, default=learning_rate,
                       help="Peak learning rate; a new value on resume rescales the resumed schedule.")  # fmt: skip
    train.add_argument("--weight_decay", type=NON_NEGATIVE, default=0.01)
    train.add_argument("--max_grad_norm", type=POSITIVE, default=1.0)
    train.add_argument("--lr_scheduler_type", default="linear", type=lr_schedule, metavar="SCHEDULE",
                       help="A transformers schedule: linear, cosine, constant, constant_with_warmup, ...")  # fmt: skip
    train.add_argument("--num_warmup_steps", type=NON_NEGATIVE_INT, default=warmup)
    train.add_argument("--num_train_epochs", type=POSITIVE_INT, default=epochs)
    train.add_argument("--max_train_steps", type=POSITIVE_INT, default=None, help="Overrides --num_train_epochs.")
    train.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                       help="Default: what `accelerate config`/`accelerate launch` says, else no.")  # fmt: skip
    train.add_argument("--checkpointing_steps", type=POSITIVE_INT, default=None, help="Save a resumable state every N steps.")
    train.add_argument("--checkpoints_total_limit", type=POSITIVE_INT, default=2, help="Keep only the newest N checkpoints.")
    train.add_argument("--resume_from_checkpoint", default=None,
                       help="'latest' (this --output_dir's newest checkpoint; none: start fresh) or a checkpoint folder.")  # fmt: skip
    train.add_argument("--seed", type=NON_NEGATIVE_INT, default=0)
    train.add_argument("--num_workers", type=NON_NEGATIVE_INT, default=0, help="DataLoader worker processes.")
    train.add_argument("--report_to", default="all", help="tensorboard, wandb, ... ; all = every installed tracker; none.")
    train.add_argument("--logging_steps", type=POSITIVE_INT, default=10)
    if not cmal_model:
        return train
    train.add_argument("--gradient_checkpointing", action="store_true")
    train.add_argument("--padding_free", action="store_true",
                       help="Compute nothing on padding: layers run the real tokens and regions packed "
                            "(CMALConfig.padding_free; the same outputs; faster when batches carry much padding).")  # fmt: skip
    train.add_argument("--push_to_hub", action="store_true", help="Upload the final folder to --hub_model_id.")
    train.add_argument("--hub_model_id", default=None, help="Repo id (user/name); default: the output folder's name.")
    train.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repo as private.")
    return train


@dataclasses.dataclass(frozen=True)
class TrainingRun:
    """What the training loop (`loop.py`), the output folder (`run_folder.py`) and the accelerator and optimizer
    (`runtime.py`) read of a run: the flags of `add_training_args`, built once from the parsed arguments
    (`from_args`), as transformers' `TrainingArguments` is for its `Trainer`. The script's own flags (data, model,
    upload) stay with the script; `script_args` keeps them all, as `train_results.json` and the trackers record them."""

    output_dir: str
    overwrite_output_dir: bool
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    weight_decay: float
    max_grad_norm: float
    lr_scheduler_type: str
    num_warmup_steps: int
    num_train_epochs: int
    max_train_steps: int | None
    mixed_precision: str | None
    checkpointing_steps: int | None
    checkpoints_total_limit: int
    resume_from_checkpoint: str | None
    seed: int
    report_to: str
    logging_steps: int
    command: str  # the command line that started the run, as the resume hint repeats it
    script_args: dict = dataclasses.field(repr=False, compare=False)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainingRun":
        names = [field.name for field in dataclasses.fields(cls) if field.name != "script_args"]
        missing = [name for name in names if not hasattr(args, name)]
        if missing:
            raise TypeError(f"TrainingRun.from_args: the parsed arguments lack {', '.join(missing)} (add_training_args' flags)")
        return cls(**{name: getattr(args, name) for name in names}, script_args=dict(vars(args)))


def check_training_args(p: argparse.ArgumentParser, args) -> None:
    """Shared training flags that contradict each other or the folder given, refused at parsing with the reason."""
    if args.resume_from_checkpoint == "latest" and args.overwrite_output_dir:
        p.error("--overwrite_output_dir starts the run over (deleting its checkpoints) and --resume_from_checkpoint "
                "latest continues it from them: pass one of the two")  # fmt: skip
    if os.path.islink(os.path.normpath(args.output_dir)):
        p.error(f"argument --output_dir: {args.output_dir!r} is a link to {os.path.realpath(args.output_dir)!r}; a run "
                "writes, replaces and deletes inside its folder, so it must be the folder itself: pass that path")  # fmt: skip


def lazy_main(parse_args, run_module: str):
    """A script's `main(argv=None)`: parse, then import `run_module` and return its `run(args)`, so that `--help` and
    usage errors answer before torch and transformers load."""

    def main(argv=None):
        args = parse_args(argv)
        return importlib.import_module(run_module).run(args)

    main.__doc__ = f"Parse, then run `{run_module}.run` (imported only then: `--help` answers before torch loads)."
    return main


def script_entry(main) -> None:
    """A script's `__main__`: a user error (a value, file or folder the checks refused: ValueError, OSError) ends in its
    one line and exit status 1, not a traceback around it; `CMAL_TRACEBACK=1` shows the traceback."""
    try:
        main()
    except (ValueError, OSError) as error:
        if os.environ.get("CMAL_TRACEBACK"):
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


def command_line(script: str, argv: list | None) -> str:
    """The command that ran `script` with `argv` (default: this process's), as a user would retype it to resume."""
    launcher = "accelerate launch" if "ACCELERATE_MIXED_PRECISION" in os.environ else "python"
    return f"{launcher} {shlex.join([script, *(sys.argv[1:] if argv is None else argv)])}"
