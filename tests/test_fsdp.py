"""FSDP2 for real: CMAL sharded by torch's `fully_shard` over 2 gloo processes (the wrap classes of
`training/configs/fsdp.yaml`) trains as one process does, saves its gathered weights and resumes from shards.

accelerate enables FSDP only on accelerators, so `tests/fsdp_worker.py` shards the model itself as
accelerate's FSDP2 plugin does; the GPU launch is documented in README ("Scaling out")."""

import os
import subprocess
import sys
import time
from pathlib import Path

import fsdp_worker
import psutil
import pytest
from conftest import communicate_or_kill
import torch
from safetensors.torch import load_file

from cmal.modeling_cmal import CMALForPreTraining


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
               str(REPO / "tests" / "fsdp_worker.py"), str(out)]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO / "tests"), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)  # fmt: skip
    output = communicate_or_kill([process], timeout=300)[0][0]  # a hung collective must not outlive the test
    assert process.returncode == 0, output[-4000:]
    return out


def test_sharded_training_matches_one_process(fsdp_run):
    """4 AdamW steps, 2 examples per process: the gathered weights equal one process stepping on both halves
    (the same seeds fix the anchor draws); every tensor moved, so the comparison is not of untouched weights."""
    fsdp, reference = load_file(fsdp_run / "fsdp.safetensors"), load_file(fsdp_run / "reference.safetensors")
    assert fsdp.keys() == reference.keys() and any(name.endswith("hypersphere.scale") for name in fsdp)
    for name, tensor in reference.items():
        torch.testing.assert_close(fsdp[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    torch.manual_seed(0)
    initial = CMALForPreTraining(fsdp_worker.config()).state_dict()  # the worker's start
    assert all(not torch.equal(initial[name], tensor) for name, tensor in reference.items())


def test_gathered_state_dict_saves_and_loads_exactly(fsdp_run):
    loaded = CMALForPreTraining.from_pretrained(fsdp_run / "saved").state_dict()
    fsdp = load_file(fsdp_run / "fsdp.safetensors")
    assert loaded.keys() == fsdp.keys()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in fsdp.items())


def test_resuming_from_the_sharded_checkpoint_continues_the_run(fsdp_run):
    """Model and optimizer state saved in shards (torch.distributed.checkpoint, as accelerate does for
    SHARDED_STATE_DICT) after step 2 and loaded into a fresh sharded model: its steps 3-4 end where the
    uninterrupted run ended."""
    assert {path.suffix for path in (fsdp_run / "sharded").iterdir()} >= {".distcp"}
    fsdp, resumed = load_file(fsdp_run / "fsdp.safetensors"), load_file(fsdp_run / "resumed.safetensors")
    for name, tensor in fsdp.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_a_hung_launch_is_killed_with_its_workers(tmp_path):
    """`communicate_or_kill` on a launch whose worker never ends: the timeout kills the worker too, though torch's
    elastic agent started it in a session of its own (out of reach of a kill of the launcher's group)."""
    ids, script = tmp_path / "worker.ids", tmp_path / "hang.py"
    script.write_text(f"import os, time\nopen({str(ids)!r}, 'w').write(f'{{os.getpid()}} {{os.getsid(0)}}')\ntime.sleep(600)\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29548", str(script)]
    process = subprocess.Popen(command, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    with pytest.raises(subprocess.TimeoutExpired):
        communicate_or_kill([process], timeout=20)
    worker, session = (int(value) for value in ids.read_text().split())
    assert session != process.pid  # not in the launcher's session (which start_new_session made its own)
    process.wait(timeout=10)
    deadline = time.time() + 10
    while time.time() < deadline and psutil.pid_exists(worker) and psutil.Process(worker).status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.1)
    assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE
