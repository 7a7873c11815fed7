"""FSDP2 on CMAL, run by `tests/test_fsdp.py` under `torch.distributed.run` with 2 gloo processes.

accelerate shards only on accelerators, so this applies torch's `fully_shard` itself, as accelerate's FSDP2
plugin does with `training/configs/fsdp.yaml`: one unit per module that is an instance of a class the YAML
names, then the root. It trains a few steps, gathers the full state dict (what `accelerator.get_state_dict`
does under FSDP2), saves it with `save_pretrained`, and resumes from a sharded (DCP) checkpoint. Rank 0
writes the tensors the test compares into OUT; the single-process reference is computed there too.
"""

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from conftest import make_inputs, tiny_config
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard

from cmal.modeling_cmal import CMALForPreTraining


REPO = Path(__file__).resolve().parents[1]
STEPS, RESUME_AT, PER_RANK = 4, 2, 2


def config():
    return tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def wrap_classes() -> set[str]:
    fsdp = yaml.safe_load((REPO / "training" / "configs" / "fsdp.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    return set(fsdp["fsdp_transformer_layer_cls_to_wrap"].split(","))


def shard(model):
    classes = tuple({type(m) for m in model.modules() if type(m).__name__ in wrap_classes()})
    units = [m for m in model.modules() if isinstance(m, classes)]
    for unit in units:
        fully_shard(unit)
    fully_shard(model)
    return len(units)


def batch(step: int, rank: int) -> dict:
    """Rank `rank`'s half of step `step`'s global batch: a masked word, masked regions, a mismatched pair."""
    inputs = make_inputs(batch_size=PER_RANK, seed=100 * step + rank)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, 3] = inputs["input_ids"][:, 3]
    masked_regions = torch.zeros(PER_RANK, 5, dtype=torch.bool)
    masked_regions[:, 1:3] = True
    return dict(inputs, input_ids=inputs["input_ids"].masked_fill(labels >= 0, 4), labels=labels,
                masked_regions=masked_regions, itm_labels=torch.tensor([1, 0]))  # fmt: skip


def train(model, optimizer, steps, rank, world):
    """Each rank's loss on its half; FSDP averages the gradients as DDP would (`rank=None`: the whole
    global batch in one process, averaging the halves' losses by hand). Seeds fix the anchor draws."""
    for step in steps:
        optimizer.zero_grad()
        for r in range(world) if rank is None else [rank]:
            torch.manual_seed(1000 * step + r)
            loss = model(**batch(step, r)).loss
            (loss / world if rank is None else loss).backward()
        optimizer.step()


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)


def full(state: dict) -> dict:
    return {name: tensor.detach().clone().contiguous() for name, tensor in state.items()}


def main(out: Path):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = CMALForPreTraining(config()).train()
    reference = copy.deepcopy(model)
    units = shard(model)
    optimizer = adamw(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)

    train(model, optimizer, range(RESUME_AT), rank, world)
    sharded = dict(zip(("model", "optimizer"), get_state_dict(model, optimizer)))
    dcp.save(sharded, checkpoint_id=out / "sharded")
    train(model, optimizer, range(RESUME_AT, STEPS), rank, world)
    gathered = get_model_state_dict(model, options=options)

    resumed = CMALForPreTraining(config()).train()
    shard(resumed)
    resumed_optimizer = adamw(resumed)
    state = dict(zip(("model", "optimizer"), get_state_dict(resumed, resumed_optimizer)))
    dcp.load(state, checkpoint_id=out / "sharded")
    set_state_dict(resumed, resumed_optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    train(resumed, resumed_optimizer, range(RESUME_AT, STEPS), rank, world)
    resumed_gathered = get_model_state_dict(resumed, options=options)

    if rank == 0:
        assert isinstance(model, FSDPModule) and units == 4, units  # 1 text + 1 visual + 2 unified layers
        model.save_pretrained(out / "saved", state_dict=gathered)
        train(reference, adamw(reference), range(STEPS), None, world)
        save_file(full(gathered), out / "fsdp.safetensors")
        save_file(full(resumed_gathered), out / "resumed.safetensors")
        save_file(full(reference.state_dict()), out / "reference.safetensors")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
