"""What the training scripts take from the machine: as many torch threads as the cores other work leaves idle
(`use_idle_cores`: a team larger than the idle cores waits on its slowest thread at every op, and under load
stalled), and the trackers that are installed (`trackers`: a base install has none, and `--report_to all` must
not make accelerate warn)."""

import os

import pytest
import torch

from cmal.training import runtime


@pytest.fixture
def threads():
    """Torch at 2 threads, and a process that has not chosen yet."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    runtime._choose_threads.cache_clear()
    yield
    torch.set_num_threads(before)
    runtime._choose_threads.cache_clear()


@pytest.mark.parametrize("idle, expected", [(0.0, 1), (0.4, 1), (0.6, 1), (1.6, 2), (5.0, 2), (None, 2)])
def test_threads_follow_the_idle_cores(threads, monkeypatch, idle, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "idle_cores", lambda: idle)
    assert runtime.use_idle_cores(torch.device("cpu")) == expected == torch.get_num_threads()  # never more than torch's own count


def test_a_process_chooses_once(threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    measured = []
    monkeypatch.setattr(runtime, "idle_cores", lambda: measured.append(1) or 0.6)
    assert [runtime.use_idle_cores(torch.device("cpu")) for _ in range(3)] == [1, 1, 1] and measured == [1]


def test_omp_num_threads_decides_when_set(threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(runtime, "idle_cores", lambda: 0.0)
    assert runtime.use_idle_cores(torch.device("cpu")) == 2


def test_an_accelerator_run_keeps_torchs_threads(threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "idle_cores", lambda: 0.0)
    assert runtime.use_idle_cores(torch.device("cuda")) == 2 == torch.get_num_threads()


def test_idle_cores_are_read_from_the_machine():
    idle = runtime.idle_cores(window=0.2)
    assert idle is None or 0 <= idle <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize("installed, report_to, expected", [
    ([], "all", None), (["tensorboard"], "all", ["tensorboard"]), (["tensorboard"], "none", None),
    ([], "wandb", "wandb"),  # named: accelerate's own error if it is missing
])  # fmt: skip
def test_report_to_all_is_the_installed_trackers(monkeypatch, installed, report_to, expected):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: installed)
    assert runtime.trackers(report_to) == expected
