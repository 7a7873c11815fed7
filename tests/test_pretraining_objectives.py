"""Where each pre-training objective is computed: MLM/MRM/AMC on the masked pass, ITM/ITC on a clean pass."""

import pytest
import torch
from conftest import NUM_CONCEPTS, make_inputs, tiny_config

from cmal.modeling_cmal import CMALForPreTraining, CMALModel


NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
MASK_ID = 4


def masked_batch(seed=0):
    """A pre-training batch: example 0 has a masked word, example 1 masked regions, example 2 is a mismatched pair."""
    inputs = make_inputs(seed=seed)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[0, 3] = inputs["input_ids"][0, 3]
    masked_ids = inputs["input_ids"].clone()
    masked_ids[0, 3] = MASK_ID
    masked_regions = torch.zeros(3, 5, dtype=torch.bool)
    masked_regions[1, 1:3] = True
    return inputs, dict(inputs, input_ids=masked_ids, labels=labels, masked_regions=masked_regions,
                        itm_labels=torch.tensor([1, 1, 0]))  # fmt: skip


def test_masked_region_gets_the_learnt_mask_embedding():
    model = CMALModel(tiny_config(**NO_DROPOUT)).eval()
    embeddings = model.visual_encoder.embeddings
    inputs = make_inputs()
    masked = torch.zeros(3, 5, dtype=torch.bool)
    masked[:, 2] = True
    out = embeddings(inputs["visual_feats"], inputs["visual_pos"], masked)
    other = embeddings(torch.randn_like(inputs["visual_feats"]), inputs["visual_pos"], masked)
    torch.testing.assert_close(out[:, 2], other[:, 2])  # the feature is gone, only the box is left
    expected = embeddings.LayerNorm(embeddings.mask_embedding + embeddings.box_layer_norm(embeddings.box_projection(inputs["visual_pos"][:, 2])))
    torch.testing.assert_close(out[:, 2], expected)
    assert not torch.allclose(out[:, 1], other[:, 1])  # unmasked regions keep their features
    assert embeddings.mask_embedding.abs().sum() > 0  # initialised, not a zero vector

    model.train()
    batch = masked_batch()[1]
    pretraining = CMALForPreTraining(tiny_config(**NO_DROPOUT))
    pretraining(**batch).mrm_feature_loss.backward()
    assert pretraining.cmal.visual_encoder.embeddings.mask_embedding.grad.abs().sum() > 0


def test_itm_and_itc_are_computed_on_the_clean_pass():
    config = tiny_config(itc_weight=1.0, **NO_DROPOUT)
    model = CMALForPreTraining(config).train()  # training: anchors would be swapped on the masked pass
    clean, batch = masked_batch()
    torch.manual_seed(0)
    out = model(**batch)
    # the same clean pass by hand: original words, no masked region, no swap
    no_swap = torch.zeros(3, NUM_CONCEPTS, dtype=torch.bool)
    encoded = model.cmal(**clean, anchor_selection=no_swap)
    torch.testing.assert_close(out.itm_logits, model.itm_head(encoded.pooler_output))
    # masking other words or regions changes nothing of ITM
    again = dict(batch, masked_regions=torch.ones(3, 5, dtype=torch.bool))
    torch.testing.assert_close(model(**again).itm_logits, out.itm_logits)
    # ...while the masked pass does see the masks
    assert out.mrm_feature_loss > 0 and out.mlm_loss > 0


def test_mismatched_pairs_are_no_amc_targets():
    model = CMALForPreTraining(tiny_config(**NO_DROPOUT)).eval()
    _, batch = masked_batch()
    swap = torch.ones(3, NUM_CONCEPTS, dtype=torch.bool)
    out = model(**batch, anchor_selection=swap)
    only_mismatched = model(**dict(batch, itm_labels=torch.tensor([0, 0, 0])), anchor_selection=swap)
    assert out.amc_token_loss > 0 and only_mismatched.amc_token_loss == 0 and only_mismatched.amc_region_loss == 0


def test_itc_has_projections_and_a_learnt_clamped_temperature():
    config = tiny_config(itc_weight=1.0, itc_projection_dim=24, itc_temperature=0.07, **NO_DROPOUT)
    model = CMALForPreTraining(config)
    assert model.text_projection.out_features == model.image_projection.out_features == 24
    assert model.itc_temperature.item() == pytest.approx(0.07)
    _, batch = masked_batch()
    batch["itm_labels"] = torch.ones(3, dtype=torch.long)  # three true pairs: every in-batch pair contrasted
    out = model(**batch)
    assert out.itc_logits.shape == (3, 3)
    out.itc_loss.backward()
    assert model.itc_logit_scale.grad is not None and model.itc_logit_scale.grad.abs() > 0
    with torch.no_grad():
        model.itc_logit_scale.fill_(20.0)  # exp(-20) ~ 2e-9: clamped to 0.001
    assert model.itc_temperature.item() == pytest.approx(0.001)


def test_itc_parameters_exist_only_with_itc_on():
    """DDP stalls on parameters that get no gradient: without ITC there are none of its."""
    model = CMALForPreTraining(tiny_config(itc_weight=0.0))
    assert model.text_projection is None and model.itc_logit_scale is None
    assert not any(name.startswith(("text_projection", "image_projection", "itc_")) for name, _ in model.named_parameters())


def test_mask_embedding_is_in_the_graph_without_masked_regions():
    """DDP (and transformers' gradient checks) need a gradient for every parameter, masked regions or not."""
    model = CMALModel(tiny_config(**NO_DROPOUT))
    model(**make_inputs()).last_hidden_state.sum().backward()
    assert model.visual_encoder.embeddings.mask_embedding.grad is not None
