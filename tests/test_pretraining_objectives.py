"""Where each pre-training objective is computed: MLM/MRM/AMC on the masked pass, ITM/ITC on a clean pass."""

import numpy as np
import pytest
import torch
from conftest import NUM_CONCEPTS, add_shape_colour_image, make_inputs, tiny_config, write_tiny_config
from datasets import Dataset, DatasetDict

from cmal.modeling_cmal import CMALForPreTraining, CMALModel
from cmal.modeling_cmal.modeling_cmal import hard_negative_pairs
from cmal.training.data.region_store import RegionStoreWriter


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


def test_unmasked_pairs_are_encoded_once():
    """Scoring pairs with nothing masked or swapped (evaluation): the masked pass is the clean one, so it runs once."""
    model = CMALForPreTraining(tiny_config(itc_weight=1.0, **NO_DROPOUT)).eval()
    clean, _ = masked_batch()
    calls = []
    handle = model.cmal.register_forward_hook(lambda module, args, output: calls.append(output))
    out = model(**clean, itm_labels=torch.tensor([1, 1, 0]))
    handle.remove()
    assert len(calls) == 1
    no_swap = torch.zeros(3, NUM_CONCEPTS, dtype=torch.bool)
    torch.testing.assert_close(out.itm_logits, model.itm_head(model.cmal(**clean, anchor_selection=no_swap).pooler_output))
    assert out.itc_loss > 0


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


def test_hard_negatives_are_the_most_similar_other_images():
    """ALBEF's ITM negatives: per text an image, per image a text, drawn by ITC similarity, never the same image."""
    features = torch.randn(5, 2, 3)
    features[3] = features[1]  # two captions of one image
    pairs = torch.tensor([True, True, True, True, False])
    similarity = torch.zeros(5, 5)
    similarity[0, 2] = similarity[2, 0] = 50.0  # texts 0 and 2 look like each other's images
    similarity[1, 1] = similarity[3, 1] = similarity[1, 3] = 50.0  # ...and 1, 3 like their own (shared) image
    torch.manual_seed(0)
    texts, images = hard_negative_pairs(similarity, pairs, features)
    assert len(texts) == len(images) == 8  # 4 texts draw an image, 4 images draw a text; row 4 is no pair
    drawn = set(zip(texts.tolist(), images.tolist()))
    assert {(0, 2), (2, 0)} <= drawn
    assert not drawn & {(1, 1), (1, 3), (3, 1), (3, 3), (0, 0), (2, 2)} and 4 not in texts and 4 not in images
    for _ in range(20):  # 1 and 3 never draw their shared image, whatever the similarity says
        texts, images = hard_negative_pairs(similarity, pairs, features)
        assert all(not torch.equal(features[t], features[i]) for t, i in zip(texts, images))
    only_one = hard_negative_pairs(similarity, torch.tensor([False, True, False, True, False]), features)
    assert len(only_one[0]) == 0  # the two pairs share one image: nothing to draw


def test_itm_adds_hard_negatives_in_training():
    model = CMALForPreTraining(tiny_config(itc_weight=1.0, **NO_DROPOUT))
    clean, _ = masked_batch()
    batch = dict(clean, itm_labels=torch.tensor([1, 1, 1]))
    calls = []
    model.cmal.register_forward_hook(lambda module, args, kwargs, output: calls.append(kwargs), with_kwargs=True)
    model.train()(**batch, anchor_selection=torch.zeros(3, NUM_CONCEPTS, dtype=torch.bool))
    assert len(calls) == 2 and calls[1]["input_ids"].shape[0] == 6  # 3 texts and 3 images drew a negative
    model.eval()(**batch)
    no_hard = CMALForPreTraining(tiny_config(itc_weight=1.0, itm_hard_negatives=False, **NO_DROPOUT)).train()
    no_hard.cmal.register_forward_hook(lambda module, args, kwargs, output: calls.append(kwargs), with_kwargs=True)
    no_hard(**batch, anchor_selection=torch.zeros(3, NUM_CONCEPTS, dtype=torch.bool))
    assert len(calls) == 4  # one pass each: evaluation and itm_hard_negatives=False draw none


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


def compositional_world(root, num_images=80, held_out=16, seed=0, max_objects=3):
    """Images of 1-`max_objects` objects whose region features encode shape and colour, one caption each
    naming them; the last `held_out` images are the validation split."""
    names, colours = ["ball", "box", "cone", "ring"], ["red", "green", "blue", "yellow"]
    rng = np.random.default_rng(seed)
    rows = {"train": [], "validation": []}
    with RegionStoreWriter(str(root / "regions"), feature_dim=16, concept_names=names, source="test", shard_size=50) as writer:
        for i in range(num_images):
            shapes, hues = add_shape_colour_image(writer, rng, f"img{i}", max_objects=max_objects)
            words = [f"a {colours[c]} {names[s]}" for s, c in zip(shapes, hues)]
            rows["validation" if i >= num_images - held_out else "train"].append(
                {"image_id": f"img{i}", "text": "there is " + " and ".join(words)}
            )
    DatasetDict({name: Dataset.from_list(split) for name, split in rows.items()}).save_to_disk(str(root / "captions"))
    write_tiny_config(root)


def held_out_after_pretraining(root, *flags) -> dict:
    """`results["validation"]` of the tiny model pre-trained on `root` with these objective and schedule flags."""
    from cmal.training import pretrain

    results = pretrain.main([
        "--dataset", str(root), "--model_config", str(root / "tiny.json"), "--output_dir", str(root / "out"),
        "--report_to", "none", "--num_warmup_steps", "5", "--logging_steps", "50", "--per_device_train_batch_size", "16",
        "--mlm", "0", "--mrm", "0", "--amc", "0", *flags,
    ])  # fmt: skip
    return results["validation"]


def test_contrastive_baseline_retrieves_held_out_images_far_above_chance(tmp_path):
    """ITC alone, 150 steps on 64 images: held-out text->image R@1 over 16 unseen images (chance 6.25%) was
    56-69% over seeds 0-2 (measured); the floor here is 4x chance."""
    compositional_world(tmp_path)
    held_out = held_out_after_pretraining(tmp_path, "--itm", "0", "--itc", "1", "--itm_negative_probability", "0",
                                          "--curriculum_epochs", "0", "--max_train_steps", "150", "--learning_rate", "3e-3")  # fmt: skip
    assert held_out["itc_images"] == 16
    assert held_out["itc_text_to_image_r1"] >= 4 * 100 / 16, held_out


def test_itm_learns_to_tell_held_out_pairs_apart(tmp_path):
    """ITM alone, 800 steps on a 240-image world of 1-3 objects, the first 450 on its small scenes: held-out
    AUC over 60 unseen images (half paired with another image) was 0.88 and 0.92 for seeds 0 and 1
    (0.86 and 0.74 without the curriculum); the floor here is 0.75 (chance 0.5)."""
    compositional_world(tmp_path, num_images=300, held_out=60)
    held_out = held_out_after_pretraining(tmp_path, "--itm", "1", "--itc", "0", "--curriculum_epochs", "30",
                                          "--max_train_steps", "800", "--learning_rate", "1e-3")  # fmt: skip
    assert held_out["itm_pairs"] == 60
    assert held_out["itm_auc"] >= 0.75, held_out
