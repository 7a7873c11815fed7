"""The Hub upload: a training folder is checked for completeness, then its allowlisted files are committed.

No upload happens in these tests: `huggingface_hub.HfApi` is replaced at its boundary by a fake that
records the calls, and the tests check exactly which files would have been committed.
"""

import json
import os
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from safetensors.torch import save_file
from test_pipelines import ANSWERS, save_head

from cmal.modeling_cmal import CMALForPreTraining, CMALForQuestionAnswering
from cmal.training import push_to_hub as push_cli
from cmal.training.hub import hub_files


VQA_FILES = ["README.md", "anchor_lexicon.py", "config.json", "configuration_cmal.py", "eval_results.json",
             "image_processing_cmal.py", "legacy_cmal.py", "model.safetensors", "modeling_cmal.py", "pipeline_cmal.py",
             "processing_cmal.py", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
             "validation_cmal.py"]  # fmt: skip


class FakeApi:
    """Records `create_repo`/`create_commit` instead of talking to the Hub."""

    calls = []

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")  # a RepoUrl: the Hub adds the owner

    def create_commit(self, repo_id, operations, commit_message):
        self.calls.append(("create_commit", repo_id, [(op.path_in_repo, op.path_or_fileobj) for op in operations]))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")


@pytest.fixture
def vqa_folder(tmp_path):
    folder = tmp_path / "vqa"
    save_head(CMALForQuestionAnswering, folder, id2label=ANSWERS)
    (folder / "README.md").write_text("---\nlibrary_name: transformers\n---\n# card\n")
    (folder / "eval_results.json").write_text("{}")
    (folder / "checkpoints" / "step_2").mkdir(parents=True)
    (folder / "model.safetensors.tmp").write_text("half a write")
    return folder


def test_hub_files_are_the_complete_folder(vqa_folder):
    assert hub_files(str(vqa_folder)) == VQA_FILES  # no checkpoints/, no unfinished .tmp


@pytest.mark.parametrize(
    "remove, message",
    [
        ("modeling_cmal.py", r"modeling_cmal.py \(code named in config.json\)"),
        ("pipeline_cmal.py", r"pipeline_cmal.py \(code named in config.json\)"),
        ("image_processing_cmal.py", r"image_processing_cmal.py \(code imported by processing_cmal.py\)"),
        ("validation_cmal.py", r"validation_cmal.py \(code imported by modeling_cmal.py\)"),
        ("legacy_cmal.py", r"legacy_cmal.py \(code imported by modeling_cmal.py\)"),
        ("model.safetensors", r"model.safetensors \(the weights\)"),
        ("tokenizer.json", r"tokenizer.json \(the tokenizer\)"),
        ("README.md", r"README.md \(the model card\)"),
    ],
)
def test_incomplete_folder_is_refused_and_nothing_is_uploaded(vqa_folder, monkeypatch, remove, message):
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    FakeApi.calls = []
    os.remove(vqa_folder / remove)
    with pytest.raises(ValueError, match=r"is not a complete model folder, so it is not uploaded: missing " + message):
        push_cli.main([str(vqa_folder), "me/cmal-vqa"])
    assert FakeApi.calls == []


def test_sharded_weights_need_every_shard(tmp_path):
    folder = tmp_path / "pre"
    save_head(CMALForPreTraining, folder)
    (folder / "README.md").write_text("# card\n")
    os.remove(folder / "model.safetensors")
    weight_map = {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"missing model-00002-of-00002.safetensors \(a weight shard\)$"):
        hub_files(str(folder))


def test_cli_commits_exactly_the_checked_files(vqa_folder, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    FakeApi.calls = []
    push_cli.main([str(vqa_folder), "me/cmal-vqa", "--private"])
    assert FakeApi.calls[0] == ("create_repo", "me/cmal-vqa", True, True)
    name, repo, operations = FakeApi.calls[1]
    assert (name, repo) == ("create_commit", "me/cmal-vqa")
    assert operations == [(f, str(vqa_folder / f)) for f in VQA_FILES]
    assert capsys.readouterr().out.strip() == "https://huggingface.co/me/cmal-vqa/commit/0"


def test_not_a_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"expected a model folder to upload, got '.*nope' \(not a directory\)"):
        hub_files(str(tmp_path / "nope"))


def test_only_the_allowlist_is_uploaded(vqa_folder, tmp_path):
    token = tmp_path / "token"
    token.write_text("hf_secret")
    for name in (".env", "nohup.out", "train.log", "notes.txt", "events.out.tfevents.1"):
        (vqa_folder / name).write_text("HF_TOKEN=hf_secret")
    (vqa_folder / "hf_token").symlink_to(token)
    (vqa_folder / ".git").mkdir()
    assert hub_files(str(vqa_folder)) == VQA_FILES


@pytest.mark.parametrize("name", ["eval_results.json", "modeling_cmal.py"])
def test_a_needed_file_that_is_a_link_out_of_the_folder_is_refused(vqa_folder, tmp_path, name):
    (tmp_path / "token").write_text("hf_secret")
    os.remove(vqa_folder / name)
    (vqa_folder / name).symlink_to(tmp_path / "token")
    with pytest.raises(ValueError, match=rf"{name} is a link \(to .*token\): only files inside the folder are uploaded"):
        hub_files(str(vqa_folder))


def test_a_half_written_weights_file_is_refused(vqa_folder):
    weights = vqa_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model.safetensors is not a complete safetensors file \(.*not fully covered"):
        hub_files(str(vqa_folder))


def test_shards_must_hold_what_their_index_says(tmp_path):
    folder = tmp_path / "pre"
    save_head(CMALForPreTraining, folder)
    (folder / "README.md").write_text("# card\n")
    os.remove(folder / "model.safetensors")
    save_file({"a.weight": torch.ones(2)}, folder / "model-00001-of-00002.safetensors")
    save_file({"b.weight": torch.ones(2), "c.weight": torch.ones(2)}, folder / "model-00002-of-00002.safetensors")
    weight_map = {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(ValueError, match=r"model-00002-of-00002.safetensors holds 2 tensors but the shard index names 1 "
                                         r"for it \(e.g. \['c.weight'\]\)"):  # fmt: skip
        hub_files(str(folder))
    weight_map["c.weight"] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert "model-00002-of-00002.safetensors" in hub_files(str(folder))
    assert "model.safetensors.index.json" in hub_files(str(folder))
