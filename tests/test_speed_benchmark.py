"""benchmarks/speed.py at tiny size: the structure of its result, its FLOP count, and that gradient
checkpointing cuts CMAL's activation memory (MemTracker, deterministic). Nothing here is timed."""

import sys
from pathlib import Path

import pytest


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import speed  # noqa: E402

from cmal.modeling_cmal import CMALConfig  # noqa: E402


BATCH_SIZE = 4
ADAPTIVE_EXAMPLES = 800  # mega-batches of 50 batches, as in a corpus


@pytest.fixture(scope="module")
def result():
    args = speed.parse_args(["--size", "tiny", "--batch_size", str(BATCH_SIZE), "--steps", "1", "--warmup", "0", "--no_data",
                             "--adaptive_examples", str(ADAPTIVE_EXAMPLES), "--adaptive_batches", "20"])
    return speed.benchmark(args)


def cmal_forward_flops(config: CMALConfig, text_len: int, num_regions: int) -> int:
    """2 x (weights in matmuls) x positions, plus 4 x L^2 x hidden per attention layer, plus pooler and head."""
    h, i = config.hidden_size, config.intermediate_size
    layer_weights = 4 * h * h + 2 * h * i

    def encoder(num_layers, length):
        return num_layers * (2 * layer_weights * length + 4 * length * length * h)

    visual_embeddings = 2 * (config.visual_feat_dim + config.visual_pos_dim) * h * num_regions
    pooler_and_head = 2 * h * h + 2 * h * speed.NUM_CLASSES
    return (
        encoder(config.num_text_layers, text_len)
        + encoder(config.num_visual_layers, num_regions)
        + encoder(config.num_hidden_layers, text_len + num_regions)
        + visual_embeddings
        + pooler_and_head
    )


def test_every_row_present(result):
    keys = {(row["model"], row["mode"], row["attention"], row["checkpointing"]) for row in result["rows"]}
    expected = {
        (model, mode, attention, checkpointing)
        for model in ("CMAL", "VisualBERT", "LXMERT")
        for attention in ("eager", "sdpa")
        for mode, options in (("inference", (False,)), ("training", (False, True)))
        for checkpointing in options
    }
    assert keys == expected
    assert set(result["models"]) == {"CMAL", "VisualBERT", "LXMERT"}
    assert all(model["params"] > 0 and model["depth"] for model in result["models"].values())
    assert {"torch", "transformers", "device_name", "threads", "date"} <= set(result["environment"])


def test_supported_rows_are_measured(result):
    cmal = [row for row in result["rows"] if row["model"] == "CMAL"]
    assert all(row["supported"] for row in cmal)  # CMAL supports eager, sdpa and checkpointing
    for row in result["rows"]:
        if not row["supported"]:
            continue
        assert row["samples_per_s"] > 0 and row["flops_per_sample"] > 0 and row["mfu"] > 0
        assert row["peak_total"] > 0 and row["peak_activations"] > 0
        if row["model"] != "CMAL":
            assert row["cmal_speed_ratio"] > 0 and row["cmal_memory_ratio"] > 0
    assert result["matmul_peak_flops"] > 0
    table = speed.markdown(result)
    assert "| CMAL | training | sdpa | on |" in table and "n/a" in table


def test_cmal_forward_flops_match_analytic_count(result):
    config = CMALConfig.from_preset("tiny")
    expected = cmal_forward_flops(config, result["text_len"], result["num_regions"])
    (row,) = [row for row in result["rows"]
              if (row["model"], row["mode"], row["attention"]) == ("CMAL", "inference", "eager")]  # fmt: skip
    assert row["flops_per_sample"] == pytest.approx(expected, rel=0.10)
    (train,) = [row for row in result["rows"]
                if (row["model"], row["mode"], row["attention"], row["checkpointing"]) == ("CMAL", "training", "eager", False)]  # fmt: skip
    # backward = 2 x forward, less the input gradient of the region projections (the inputs need none)
    visual_embeddings = 2 * (config.visual_feat_dim + config.visual_pos_dim) * config.hidden_size * result["num_regions"]
    assert train["flops_per_sample"] == pytest.approx(3 * expected - visual_embeddings, rel=0.10)


def test_gradient_checkpointing_cuts_cmal_activations(result):
    assert result["environment"]["device"] == "cpu"  # activations from MemTracker
    assert result["cmal_checkpointing_saving"] >= 0.40


def test_adaptive_batches_cut_padding(result):
    """FLOP counts, not times: the same examples padded in random batches waste the most; length grouping less;
    with the negative window, whose ITM negatives keep a batch's region counts, least of all."""
    adaptive = result["adaptive"]
    share = {(row["model"], row["scheme"], row["padding_free"]): row["padded_flop_share"] for row in adaptive["rows"]}
    assert set(share) == set(speed.ADAPTIVE_ROWS)
    for model in ("CMAL", "VisualBERT"):
        assert share[model, "length-grouped + negative window", False] < 0.5 * share[model, "random batches", False]
        assert 0 <= share[model, "length-grouped + negative window", False] < 0.15
    padded = [share["CMAL", scheme, False] for scheme in ("length-grouped + negative window", "length-grouped", "random batches")]
    assert padded == sorted(padded) and len(set(padded)) == 3
    # packed, only attention still sees padding (re-padded per layer): a few percent at most
    for scheme in ("random batches", "length-grouped"):
        assert 0 <= share["CMAL", scheme, True] < min(0.10, 0.25 * share["CMAL", scheme, False])
    for row in adaptive["rows"]:
        assert row["samples_per_s"] > 0 and row["real_flops_per_sample"] > 0 and row["speed_at_equal_flops_vs_visualbert"] > 0
    table = speed.markdown(result)
    assert "| CMAL | length-grouped + negative window | no |" in table and "| CMAL | random batches | yes |" in table


def test_adaptive_examples_are_the_same_under_every_scheme():
    args = speed.parse_args(["--size", "base", "--batch_size", "4", "--adaptive_examples", "40"])
    examples = {scheme: speed.adaptive_batches(args, scheme) for scheme in speed.ADAPTIVE_SCHEMES}
    captions = {scheme: sorted(t for batch in batches for t, _ in batch) for scheme, batches in examples.items()}
    assert len({tuple(c) for c in captions.values()}) == 1 and len(captions["random batches"]) == 40
    regions = [r for batch in examples["random batches"] for _, r in batch]
    assert 10 <= min(regions) and max(regions) <= 100
