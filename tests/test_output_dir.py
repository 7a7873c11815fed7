"""The output-folder policy of the training scripts: no run silently mixes with or deletes another's work,
reruns after an interrupt say how to resume, and the final folder is replaced whole or not at all."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, die_after_saving, pretrain_args
from safetensors.torch import load_file

from cmal.training import finetune, pretrain
from cmal.training.run_folder import RUN_FILES, final_folder, recover_final_folder


@pytest.fixture
def corpus(pretraining_corpus):
    return pretraining_corpus


def run(corpus, folder, *extra):
    return pretrain.main(pretrain_args(corpus, folder, *extra))


def steps_of(folder) -> int:
    return json.loads((folder / "train_results.json").read_text())["steps"]


def test_a_non_empty_output_dir_is_refused_before_any_data_is_loaded(tmp_path):
    """The data given here is empty: reading it would fail otherwise."""
    for part in ("data/regions", "data/captions", "out"):
        (tmp_path / part).mkdir(parents=True)
    (tmp_path / "out" / "notes.txt").write_text("mine")
    (tmp_path / "questions.json").write_text("")
    argv = ["--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    with pytest.raises(ValueError, match=r"--output_dir .* is not empty; it holds notes.txt: or pass --overwrite_output_dir"):
        pretrain.main(["--dataset", str(tmp_path / "data"), *argv])
    with pytest.raises(ValueError, match=r"--output_dir .* is not empty"):
        finetune.main(["--task", "vqa", "--train_file", str(tmp_path / "questions.json"), "--regions", str(tmp_path / "data"), *argv])
    assert os.listdir(tmp_path / "out") == ["notes.txt"]


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "model").write_text("")
    with pytest.raises(ValueError, match=r"--output_dir .*model' is a file; expected a folder"):
        pretrain.main(["--output_dir", str(tmp_path / "model"), "--report_to", "none"])


def test_a_rerun_says_how_to_resume_and_a_finished_run_resumed_trains_no_step(corpus, tmp_path):
    folder = tmp_path / "run"
    run(corpus, folder, "--max_train_steps", "4", "--checkpointing_steps", "2")
    before = load_file(folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"holds this run's checkpoints up to step 4: resume with "
                                         r"`python training/pretrain.py .* --resume_from_checkpoint latest`"):  # fmt: skip
        run(corpus, folder, "--max_train_steps", "4", "--checkpointing_steps", "2")
    results = run(corpus, folder, "--max_train_steps", "4", "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest")
    assert results["steps"] == 4 and results["final_losses"] == {}  # no step trained
    after = load_file(folder / "model.safetensors")
    assert all(bool((before[k] == after[k]).all()) for k in before)
    assert sorted(os.listdir(folder / "checkpoints")) == ["step_2", "step_4"]


def test_overwrite_starts_over_so_latest_is_this_runs(corpus, tmp_path):
    folder = tmp_path / "run"
    run(corpus, folder, "--max_train_steps", "2")
    with pytest.raises(ValueError, match=r"is not empty; it holds a finished run \(train_results.json\): or pass --overwrite"):
        run(corpus, folder, "--max_train_steps", "2")
    run(corpus, folder, "--max_train_steps", "4", "--checkpointing_steps", "2", "--overwrite_output_dir")
    run(corpus, folder, "--max_train_steps", "3", "--checkpointing_steps", "3", "--overwrite_output_dir")
    assert sorted(os.listdir(folder / "checkpoints")) == ["step_3"]
    assert steps_of(folder) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging or `.old` folder left behind


def test_resuming_an_earlier_checkpoint_refuses_to_keep_newer_ones(corpus, tmp_path):
    folder = tmp_path / "run"
    run(corpus, folder, "--max_train_steps", "6", "--checkpointing_steps", "2", "--checkpoints_total_limit", "3")
    earlier = str(folder / "checkpoints" / "step_2")
    with pytest.raises(ValueError, match=r"step_4, .*step_6 are newer than --resume_from_checkpoint .*step_2"):
        run(corpus, folder, "--max_train_steps", "6", "--checkpointing_steps", "2", "--resume_from_checkpoint", earlier)
    results = run(corpus, folder, "--max_train_steps", "6", "--checkpointing_steps", "2", "--checkpoints_total_limit", "3",
                  "--resume_from_checkpoint", earlier, "--overwrite_output_dir")  # fmt: skip
    assert results["steps"] == 6
    assert sorted(os.listdir(folder / "checkpoints")) == ["step_2", "step_4", "step_6"]


def test_a_final_save_cut_short_leaves_the_previous_folder(tmp_path):
    folder = tmp_path / "model"
    (folder / "checkpoints" / "step_2").mkdir(parents=True)
    (folder / "model.safetensors").write_text("previous")
    with pytest.raises(KeyboardInterrupt), final_folder(str(folder)) as staging:
        (tmp_path / "model.tmp" / "model" / "model.safetensors").write_text("half")
        assert staging == str(tmp_path / "model.tmp" / "model")
        raise KeyboardInterrupt
    assert (folder / "model.safetensors").read_text() == "previous"
    recover_final_folder(str(folder))  # the next start drops the unfinished staging folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    with final_folder(str(folder)) as staging:
        (tmp_path / "model.tmp" / "model" / "model.safetensors").write_text("new")
    assert (folder / "model.safetensors").read_text() == "new"
    assert (folder / "checkpoints" / "step_2").is_dir()  # the run's sub-folders move into the new folder


@pytest.mark.parametrize("new_folder_in_place", [False, True])
def test_a_kill_between_the_renames_is_recovered(tmp_path, new_folder_in_place):
    folder, old = tmp_path / "model", tmp_path / "model.old"
    (old / "checkpoints").mkdir(parents=True)
    (old / "model.safetensors").write_text("previous")
    if new_folder_in_place:
        folder.mkdir()
        (folder / "model.safetensors").write_text("new")
    recover_final_folder(str(folder))
    assert (folder / "model.safetensors").read_text() == ("new" if new_folder_in_place else "previous")
    assert (folder / "checkpoints").is_dir() and not old.exists()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # what Python prints when it drops it
def test_an_interrupt_dropped_by_a_finalizer_still_stops_the_run(corpus, tmp_path, monkeypatch, capsys):
    """Python drops a KeyboardInterrupt raised while it runs a finalizer (here a generator closed by the
    collector, as one is at every epoch's end); the run stops at the next step all the same."""
    from cmal.training import loop

    save = loop.save_checkpoint

    def save_then_interrupt_in_a_finalizer(accelerator, args, step, *loss):
        save(accelerator, args, step, *loss)
        if step == 2:
            def epoch():
                try:
                    yield
                finally:
                    signal.getsignal(signal.SIGINT)(signal.SIGINT, None)

            batches = epoch()
            next(batches)
            del batches  # "Exception ignored in: <generator ...>": the interrupt is gone

    monkeypatch.setattr(loop, "save_checkpoint", save_then_interrupt_in_a_finalizer)
    with pytest.raises(SystemExit) as stopped:
        run(corpus, tmp_path / "run", "--max_train_steps", "8", "--checkpointing_steps", "2")
    assert stopped.value.code == 130 and "interrupted; step 2 is saved in" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_2"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored for the rest of the process


def test_ctrl_c_prints_one_line_with_a_resume_command_that_works(corpus, tmp_path):
    folder = tmp_path / "run"
    argv = pretrain_args(corpus, folder, "--max_train_steps", "400", "--checkpointing_steps", "2")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    process = subprocess.Popen([sys.executable, "training/pretrain.py", *argv], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and not (folder / "checkpoints" / "step_2").exists():
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted; step ") and " is saved in " in last, last
    command = shlex.split(last.split("resume with `")[1].rstrip("`"))
    assert command[:2] == ["python", "training/pretrain.py"] and command[-2:] == ["--resume_from_checkpoint", "latest"]
    command[command.index("400")] = "6"  # finish soon
    resumed = subprocess.run([sys.executable, *command[1:]], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and steps_of(folder) == 6


@pytest.mark.parametrize("script", [pretrain, finetune])
@pytest.mark.parametrize("flags, message", [
    (["--resume_from_checkpoint", "latest", "--overwrite_output_dir"],
     "--overwrite_output_dir starts the run over (deleting its checkpoints) and --resume_from_checkpoint latest "
     "continues it from them: pass one of the two"),
    (["LINK"], "argument --output_dir: '{link}' is a link to '{run}'; a run writes, replaces and deletes inside its folder"),
])  # fmt: skip
def test_contradictory_flags_are_refused_at_parsing(tmp_path, capsys, script, flags, message):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.safetensors").write_text("another run's")
    (tmp_path / "link").symlink_to(tmp_path / "run", target_is_directory=True)
    folder = tmp_path / ("link" if flags == ["LINK"] else "run")
    argv = ["--output_dir", str(folder), *[f for f in flags if f != "LINK"], *(["--task", "vqa"] if script is finetune else [])]
    with pytest.raises(SystemExit) as stopped:
        script.parse_args(argv)
    assert stopped.value.code == 2
    assert message.format(link=tmp_path / "link", run=tmp_path / "run") in capsys.readouterr().err
    assert (tmp_path / "run" / "model.safetensors").read_text() == "another run's"


@pytest.mark.parametrize("flag", [["--overwrite_output_dir"], ["--resume_from_checkpoint", "latest"]])
def test_a_run_never_replaces_files_it_did_not_write(corpus, tmp_path, flag):
    """The final save lists what it wrote (`RUN_FILES`), in one file mode; a later run that would replace the
    folder's files (starting over, or resuming and saving at the end) refuses while the folder holds others."""
    folder = tmp_path / "run"
    run(corpus, folder, "--max_train_steps", "2", "--checkpointing_steps", "2")
    written = json.loads((folder / RUN_FILES).read_text())
    assert {"config.json", "model.safetensors", "train_results.json", "README.md"} <= set(written)
    checkpoint = folder / "checkpoints" / "step_2"
    modes = {os.stat(path).st_mode & 0o777 for path in [*(folder / name for name in written), *checkpoint.iterdir()] if path.is_file()}
    assert len(modes) == 1, modes  # model.safetensors too, in the folder and in its checkpoints (a temporary file's 0600 before)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"--output_dir .*run' holds notes.txt, which no run of this package wrote: "
                                         r"the run's final save replaces the folder's files, so move them elsewhere first"):  # fmt: skip
        run(corpus, folder, "--max_train_steps", "2", "--checkpointing_steps", "2", *flag)
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "checkpoints" / "step_2").is_dir()
    (folder / "notes.txt").unlink()
    run(corpus, folder, "--max_train_steps", "4", "--checkpointing_steps", "2", *flag)  # the run's own files: replaced
    assert steps_of(folder) == 4


@pytest.mark.parametrize("damage, message", [
    (lambda step: (step / "model.safetensors").unlink(), r"step_4 is incomplete: it lacks its weights; resume from another checkpoint"),
    (lambda step: (step / "optimizer.bin").unlink(), r"step_4 is incomplete: it lacks its optimizer state;"),
    (lambda step: [(step / n).unlink() for n in ("scheduler.bin", "random_states_0.pkl")],
     r"step_4 is incomplete: it lacks its scheduler state, random state \(random_states_0.pkl\);"),
    (lambda step: (step / "random_states_0.pkl").write_bytes(b"not a pickle"),
     r"step_4: its random state random_states_0.pkl cannot be read \(.*\), so the resumed run would draw other batches"),
])  # fmt: skip
def test_a_checkpoint_that_cannot_resume_exactly_is_refused(corpus, tmp_path, monkeypatch, damage, message):
    folder = tmp_path / "run"
    restore = die_after_saving(monkeypatch, 4)
    with pytest.raises(SystemExit):  # interrupted after step 4's checkpoint
        run(corpus, folder, "--max_train_steps", "6", "--checkpointing_steps", "2")
    restore()
    damage(folder / "checkpoints" / "step_4")
    with pytest.raises(ValueError, match=message):
        run(corpus, folder, "--max_train_steps", "6", "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest")


def test_a_user_error_on_the_command_line_ends_in_its_one_line(tmp_path):
    (tmp_path / "model").write_text("")
    done = subprocess.run([sys.executable, "training/pretrain.py", "--output_dir", str(tmp_path / "model"), "--report_to", "none"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == f"error: --output_dir {str(tmp_path / 'model')!r} is a file; expected a folder (absent or empty, or a run to resume)"


@pytest.mark.parametrize("error", [ValueError("--x: bad"), OSError("no such file: 'y'")])
def test_script_entry_turns_a_user_error_into_its_line_and_cmal_traceback_shows_it(error, capsys, monkeypatch):
    from cmal.training.arguments import script_entry

    def main():
        raise error

    with pytest.raises(SystemExit) as stopped:
        script_entry(main)
    assert stopped.value.code == 1 and capsys.readouterr().err == f"error: {error}\n"
    monkeypatch.setenv("CMAL_TRACEBACK", "1")
    with pytest.raises(type(error)):
        script_entry(main)
    with pytest.raises(KeyError):  # a bug is not a user error: its traceback stays
        script_entry(lambda: {}["missing"])


def test_a_user_error_under_accelerate_launch_q_ends_in_its_one_line(tmp_path):
    """The README's launch (`accelerate launch -q`, one process): the script's line, exit 1, no launcher traceback."""
    (tmp_path / "model").write_text("")
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "-q", "--config_file", "training/configs/one_process.yaml",
                           "training/pretrain.py", "--output_dir", str(tmp_path / "model")], cwd=REPO, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr and "CalledProcessError" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == f"error: --output_dir {str(tmp_path / 'model')!r} is a file; expected a folder (absent or empty, or a run to resume)"
