"""Shared fixtures: offline mode, tiny configs and hand-made inputs with known anchors."""

import os


# No Hub in tests: without these every Hub call retries for 20-45 s before failing.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from modeling_cmal import CMALConfig  # noqa: E402


VOCAB_SIZE, FEAT_DIM, NUM_CONCEPTS = 99, 16, 10


def tiny_config(**overrides) -> CMALConfig:
    """The `tiny` preset with a small vocabulary and feature size, so tests run in seconds."""
    values = dict(vocab_size=VOCAB_SIZE, visual_feat_dim=FEAT_DIM, num_concepts=NUM_CONCEPTS)
    values.update(overrides)
    return CMALConfig.from_preset("tiny", **values)


def make_inputs(batch_size=3, text_len=8, num_regions=5, seed=0, pad=True) -> dict:
    """Random text and regions with anchors: concept c sits on token 1 and region 0 of every example.

    With `pad`, the last example has two padding tokens and one padded region, so masking is exercised.
    """
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB_SIZE, (batch_size, text_len), generator=g)
    input_ids[:, 0], input_ids[:, -1] = 1, 2  # stand-ins for [CLS] and [SEP]
    attention_mask = torch.ones(batch_size, text_len, dtype=torch.long)
    visual_attention_mask = torch.ones(batch_size, num_regions, dtype=torch.long)
    token_concept_ids = torch.full((batch_size, text_len), -1)
    region_concept_ids = torch.randint(0, NUM_CONCEPTS, (batch_size, num_regions), generator=g)
    for b in range(batch_size):
        concept = b % NUM_CONCEPTS
        token_concept_ids[b, 1] = concept
        region_concept_ids[b, 0] = concept
    if pad and batch_size > 1:
        attention_mask[-1, -2:] = 0
        input_ids[-1, -2:] = 0
        visual_attention_mask[-1, -1] = 0
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        visual_feats=torch.randn(batch_size, num_regions, FEAT_DIM, generator=g),
        visual_pos=torch.rand(batch_size, num_regions, 7, generator=g),
        visual_attention_mask=visual_attention_mask,
        token_concept_ids=token_concept_ids,
        region_concept_ids=region_concept_ids,
    )


@pytest.fixture
def config():
    return tiny_config()


@pytest.fixture
def inputs():
    return make_inputs()
