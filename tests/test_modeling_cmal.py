"""Model tests on tiny configs, parametrised over every head (timm style)."""

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from conftest import FEAT_DIM, NUM_CONCEPTS, VOCAB_SIZE, make_inputs, random_visual_pos, run_without_project, tiny_config
from transformers import AttentionInterface, AutoConfig, AutoModel, AutoModelForPreTraining, AutoModelForVisualQuestionAnswering
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from cmal.modeling_cmal import (
    CMAL_PRESETS,
    CMALConfig,
    CMALForImageTextClassification,
    CMALForImageTextRetrieval,
    CMALForPreTraining,
    CMALForQuestionAnswering,
    CMALForReferringExpression,
    CMALForVisualReasoning,
    CMALModel,
    anchor_operator,
)


NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
MASK_ID = 4


def pair_images(inputs: dict) -> dict:
    """NLVR2 inputs: the same text with two images (the second is the first one's regions reversed)."""
    paired = dict(inputs)
    for key in ("visual_feats", "visual_pos", "visual_attention_mask", "region_concept_ids"):
        paired[key] = torch.stack([inputs[key], inputs[key].flip(1)], dim=1)
    return paired


def head_case(name: str, batch_size: int = 3):
    """(model class, config overrides, inputs with labels, name of the logits output, logits shape)."""
    inputs = make_inputs(batch_size=batch_size)
    b, t = inputs["input_ids"].shape
    n = inputs["visual_feats"].shape[1]
    if name == "pretraining":
        labels = torch.full_like(inputs["input_ids"], -100)
        labels[:, 3] = inputs["input_ids"][:, 3]
        inputs["input_ids"][:, 3] = MASK_ID
        masked = torch.zeros(b, n, dtype=torch.bool)
        masked[:, 2] = True
        inputs.update(
            labels=labels,
            masked_regions=masked,
            itm_labels=torch.tensor([1, 0, 1][:b]),
            anchor_selection=torch.ones(b, NUM_CONCEPTS, dtype=torch.bool),
        )
        return CMALForPreTraining, dict(itc_weight=1.0), inputs, "prediction_logits", (b, t, VOCAB_SIZE)
    if name == "vqa":
        answers = {i: f"answer {i}" for i in range(6)}
        labels = torch.zeros(b, 6)
        labels[torch.arange(b), torch.arange(b) % 6] = 1.0
        labels[0, 5] = 0.3
        inputs["labels"] = labels
        return CMALForQuestionAnswering, dict(id2label=answers), inputs, "logits", (b, 6)
    if name == "ve":
        labels3 = {0: "entailment", 1: "neutral", 2: "contradiction"}
        inputs["labels"] = torch.arange(b) % 3
        return CMALForImageTextClassification, dict(id2label=labels3), inputs, "logits", (b, 3)
    if name == "nlvr2":
        inputs = pair_images(inputs)
        inputs["labels"] = torch.tensor([1, 0, 1][:b])
        return CMALForVisualReasoning, {}, inputs, "logits", (b, 2)
    if name == "rec":
        inputs["labels"] = torch.arange(b) % (n - 1)
        return CMALForReferringExpression, {}, inputs, "logits", (b, n)
    if name == "retrieval":
        inputs["labels"] = torch.tensor([1, 0, 1][:b])
        return CMALForImageTextRetrieval, {}, inputs, "logits", (b, 2)
    raise KeyError(name)


HEADS = ["pretraining", "vqa", "ve", "nlvr2", "rec", "retrieval"]


@pytest.mark.parametrize("name", HEADS)
def test_head_forward_backward(name):
    model_class, overrides, inputs, logits_name, logits_shape = head_case(name)
    torch.manual_seed(0)
    model = model_class(tiny_config(**overrides)).train()
    outputs = model(**inputs)
    assert outputs[logits_name].shape == logits_shape
    assert torch.isfinite(outputs[logits_name]).all()
    assert outputs.loss.dim() == 0 and torch.isfinite(outputs.loss)
    outputs.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    # the encoder itself learns from every head's loss
    assert model.cmal.unified_encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", HEADS)
def test_head_overfits_one_batch(name):
    """Loss falls by at least 80% within 100 steps on one fixed batch."""
    model_class, overrides, inputs, _, _ = head_case(name)
    torch.manual_seed(0)
    model = model_class(tiny_config(**overrides, **NO_DROPOUT)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(100):
        loss = model(**inputs).loss
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() <= 0.2 * first:
            break
    assert loss.item() <= 0.2 * first, f"{name}: loss {first:.4f} -> {loss.item():.4f}"


def test_pretraining_reports_each_loss_and_weights_them():
    _, overrides, inputs, _, _ = head_case("pretraining")
    torch.manual_seed(0)
    model = CMALForPreTraining(tiny_config(**overrides, **NO_DROPOUT)).eval()
    out = model(**inputs)
    parts = ["mlm_loss", "mrm_feature_loss", "mrm_concept_loss", "itm_loss", "amc_token_loss",
             "amc_region_loss", "amc_pointer_loss", "itc_loss"]  # fmt: skip
    for part in parts:
        assert out[part] is not None and torch.isfinite(out[part]) and out[part] > 0, part
    assert torch.allclose(out.loss, sum(out[p] for p in parts))

    torch.manual_seed(0)
    weighted = CMALForPreTraining(tiny_config(**{**overrides, "mlm_weight": 2.0, "itc_weight": 0.0}, **NO_DROPOUT))
    missing, unexpected = weighted.load_state_dict(model.state_dict(), strict=False)
    assert not missing and set(unexpected) == {"itc_logit_scale", *(f"{m}_projection.{p}" for m in ("text", "image") for p in ("weight", "bias"))}
    out2 = weighted.eval()(**inputs)  # without ITC the model has no ITC parameters
    assert out2.itc_loss is None
    expected = sum(out[p] for p in parts if p != "itc_loss") + out.mlm_loss
    assert torch.allclose(out2.loss, expected, atol=1e-6)


def test_pretraining_without_any_target_gives_zero_not_nan():
    """No anchors, no masked words or regions: the AMC parts are exactly 0, never NaN."""
    inputs = make_inputs()
    inputs["token_concept_ids"].fill_(-1)
    model = CMALForPreTraining(tiny_config()).train()
    out = model(**inputs)
    assert not out.token_swapped.any()
    for part in ("amc_token_loss", "amc_region_loss", "amc_pointer_loss"):
        assert out[part].item() == 0.0
    assert out.loss.item() == 0.0
    out.loss.backward()  # the zero still carries a graph (needed under DDP)


def test_itm_alone_fits_a_batch():
    """ITM on its own trains the pooled output: it fits random match labels of a fixed batch."""
    torch.manual_seed(0)
    off = dict(mlm_weight=0, mrm_weight=0, amc_token_weight=0, amc_region_weight=0, amc_pointer_weight=0)
    model = CMALForPreTraining(tiny_config(**off, **NO_DROPOUT)).train()
    inputs = make_inputs(batch_size=16)
    itm_labels = torch.tensor([0, 1] * 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(100):
        out = model(**inputs, itm_labels=itm_labels)
        if step == 0:
            assert abs(out.loss.item() - 0.693) < 0.05 and out.loss == out.itm_loss
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert out.itm_loss.item() < 0.1
    assert (out.itm_logits.argmax(-1) == itm_labels).all()


def test_mrm_soft_labels_use_kl():
    _, overrides, inputs, _, _ = head_case("pretraining")
    model = CMALForPreTraining(tiny_config(**NO_DROPOUT)).eval()
    soft = torch.softmax(torch.randn(3, 5, NUM_CONCEPTS), dim=-1)
    out = model(**inputs, region_soft_labels=soft)
    # Region 2 is masked in every pair, but pair 1 is mismatched (itm_labels [1, 0, 1]): no MRM target there.
    masked = inputs["masked_regions"] & (inputs["itm_labels"] == 1).unsqueeze(1)
    assert masked.sum() == 2
    log_probs = torch.log_softmax(out.region_concept_logits[masked], dim=-1)
    expected = torch.nn.functional.kl_div(log_probs, soft[masked], reduction="batchmean")
    assert torch.allclose(out.mrm_concept_loss, expected)
    target = inputs["visual_feats"][masked]
    assert torch.allclose(out.mrm_feature_loss, torch.nn.functional.mse_loss(out.region_feature_predictions[masked], target))


def test_vqa_logits_do_not_depend_on_labels():
    _, overrides, inputs, _, _ = head_case("vqa")
    model = CMALForQuestionAnswering(tiny_config(**overrides)).eval()
    with_labels = model(**inputs).logits
    inputs.pop("labels")
    assert torch.equal(model(**inputs).logits, with_labels)


def test_retrieval_scores_are_log_odds():
    _, _, inputs, _, _ = head_case("retrieval")
    out = CMALForImageTextRetrieval(tiny_config()).eval()(**inputs)
    torch.testing.assert_close(out.scores, out.logits.log_softmax(-1)[:, 1] - out.logits.log_softmax(-1)[:, 0], rtol=1e-5, atol=1e-6)


def test_referring_expression_ignores_padded_regions():
    _, _, inputs, _, _ = head_case("rec")
    out = CMALForReferringExpression(tiny_config()).eval()(**inputs)
    probs = out.logits.softmax(-1)
    assert probs[-1, -1] == 0  # the last example's last region is padding
    assert torch.allclose(probs.sum(-1), torch.ones(3))


def test_visual_reasoning_uses_both_images():
    _, _, inputs, _, _ = head_case("nlvr2")
    model = CMALForVisualReasoning(tiny_config()).eval()
    logits = model(**inputs).logits
    for image in (0, 1):
        changed = dict(inputs, visual_feats=inputs["visual_feats"].clone())
        changed["visual_feats"][:, image] += 1.0
        assert (model(**changed).logits - logits).abs().min() > 0, f"image {image} is ignored"


# ------------------------------------------------------------------------------------------------
# The anchor operator and the associative prompt layer, on a hand-made example
# ------------------------------------------------------------------------------------------------


def test_anchor_operator_by_hand():
    # tokens: [CLS] two dog ##s near a cat [SEP] [PAD]; concepts: dog=3 (both word pieces), cat=5
    token_concept_ids = torch.tensor([[-1, -1, 3, 3, -1, -1, 5, -1, -1]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0]])
    # regions: dog, person, cat, dog, (padded dog)
    region_concept_ids = torch.tensor([[3, 0, 5, 3, 3]])
    visual_attention_mask = torch.tensor([[1, 1, 1, 1, 0]])
    anchor_map = anchor_operator(token_concept_ids, region_concept_ids, attention_mask, visual_attention_mask)
    expected = torch.zeros(1, 9, 5, dtype=torch.bool)
    expected[0, 2, [0, 3]] = True
    expected[0, 3, [0, 3]] = True
    expected[0, 6, 2] = True
    assert torch.equal(anchor_map, expected)


def test_associative_swap_by_hand():
    """Which slots are swapped, and with which partner's uni-modal feature."""
    config = tiny_config(**NO_DROPOUT)
    model = CMALModel(config).eval()
    input_ids = torch.tensor([[1, 20, 30, 31, 40, 50, 60, 2]])  # [CLS] two dog ##s near a cat [SEP]
    token_concept_ids = torch.tensor([[-1, -1, 3, 3, -1, -1, 5, -1]])
    region_concept_ids = torch.tensor([[3, 0, 5, 3]])  # dog (score .5), person, cat, dog (score .9)
    region_scores = torch.tensor([[0.5, 0.8, 0.7, 0.9]])
    torch.manual_seed(0)
    visual_feats, visual_pos = torch.randn(1, 4, FEAT_DIM), random_visual_pos(1, 4)
    common = dict(token_concept_ids=token_concept_ids, region_concept_ids=region_concept_ids, region_scores=region_scores)

    # Swap only "dog" (concept 3), not "cat".
    selection = torch.zeros(1, NUM_CONCEPTS, dtype=torch.bool)
    selection[0, 3] = True
    out = model(input_ids, visual_feats, visual_pos, anchor_selection=selection, **common)
    assert out.token_swapped.tolist() == [[False, False, True, True, False, False, False, False]]
    assert out.region_swapped.tolist() == [[True, False, False, True]]
    # tokens take the highest-scoring dog region (3); dog regions take the first dog word piece (2)
    assert out.token_partner.tolist() == [[-1, -1, 3, 3, -1, -1, -1, -1]]
    assert out.region_partner.tolist() == [[2, -1, -1, 2]]

    # The unified encoder's input holds the partner features: rebuild it by hand from the uni-modal features.
    hidden = {}
    handle = model.unified_encoder.register_forward_pre_hook(lambda mod, args: hidden.update(x=args[0]))
    model(input_ids, visual_feats, visual_pos, anchor_selection=selection, **common)
    handle.remove()
    text, regions = out.text_features[0].clone(), out.region_features[0].clone()
    text[2], text[3] = out.region_features[0, 3], out.region_features[0, 3]
    regions[0], regions[3] = out.text_features[0, 2], out.text_features[0, 2]
    types = torch.tensor([0, 0, 2, 2, 0, 0, 0, 0, 2, 1, 1, 2])
    prompt = model.associative_prompt
    expected = prompt.LayerNorm(torch.cat([text, regions]) + prompt.modality_type_embeddings(types))
    torch.testing.assert_close(hidden["x"][0], expected)

    # In evaluation nothing is swapped by default; `prompt_at_inference` swaps every anchor.
    assert not model(input_ids, visual_feats, visual_pos, **common).token_swapped.any()
    model.config.prompt_at_inference = True
    out_all = model(input_ids, visual_feats, visual_pos, **common)
    assert out_all.token_swapped.tolist() == [[False, False, True, True, False, False, True, False]]
    assert out_all.region_swapped.tolist() == [[True, False, True, True]]


def test_mask_fill_keeps_no_partner_feature():
    """anchor_fill="mask" (the ablation): chosen anchors lose their feature and receive none in exchange."""
    model = CMALModel(tiny_config(anchor_fill="mask", **NO_DROPOUT)).eval()
    input_ids = torch.tensor([[1, 20, 30, 2]])
    common = dict(token_concept_ids=torch.tensor([[-1, -1, 3, -1]]), region_concept_ids=torch.tensor([[3, 0]]),
                  anchor_selection=torch.ones(1, NUM_CONCEPTS, dtype=torch.bool))  # fmt: skip
    visual_pos = random_visual_pos(1, 2)
    hidden = []
    handle = model.unified_encoder.register_forward_pre_hook(lambda mod, args: hidden.append(args[0]))
    out = model(input_ids, torch.randn(1, 2, FEAT_DIM), visual_pos, **common)
    model(input_ids, torch.randn(1, 2, FEAT_DIM), visual_pos, **common)  # other region features
    handle.remove()
    assert out.token_swapped.tolist() == [[False, False, True, False]] and out.region_swapped.tolist() == [[True, False]]
    prompt = model.associative_prompt
    mask_slot = prompt.LayerNorm(prompt.modality_type_embeddings.weight[2])  # the prompt type embedding alone
    torch.testing.assert_close(hidden[0][0, 2], mask_slot)  # the token slot holds no region feature
    torch.testing.assert_close(hidden[0][0, 4], mask_slot)  # nor the region slot a word feature
    torch.testing.assert_close(hidden[1][0, 2], hidden[0][0, 2])
    assert not torch.allclose(hidden[1][0, 5], hidden[0][0, 5])  # the unswapped region still carries its own


def test_training_swaps_anchors_at_the_configured_rate():
    config = tiny_config(anchor_mask_prob=0.5)
    model = CMALModel(config).train()
    inputs = make_inputs(batch_size=64, pad=False)
    torch.manual_seed(0)
    rate = torch.stack([model(**inputs).token_swapped[:, 1].float().mean() for _ in range(8)]).mean()
    assert 0.4 < rate < 0.6
    model.config.anchor_mask_prob = 0.0
    assert not model(**inputs).token_swapped.any()


def test_hypersphere_puts_features_on_a_sphere():
    inputs = make_inputs()
    model = CMALModel(tiny_config()).eval()
    out = model(**inputs)
    scale = model.config.hypersphere_init_scale
    torch.testing.assert_close(out.text_features.norm(dim=-1), torch.full((3, 8), scale))
    torch.testing.assert_close(out.region_features.norm(dim=-1), torch.full((3, 5), scale))
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(3))
    # The radius is learnt; without the sphere, features keep whatever norm the encoder gives them.
    with torch.no_grad():
        model.text_encoder.hypersphere.scale.fill_(2.0)
        model.text_encoder.layer[-1].output.LayerNorm.weight.mul_(3.0)
    torch.testing.assert_close(model(**inputs).text_features.norm(dim=-1), torch.full((3, 8), 2.0))
    plain = CMALModel(tiny_config(hypersphere=False)).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    assert plain.text_encoder.hypersphere.scale is None
    torch.testing.assert_close(plain(**inputs).text_features.norm(dim=-1), torch.full((3, 8), 3.0 * scale))


@pytest.mark.parametrize("final_layer_norm", [True, False])
def test_hypersphere_constrains_only_without_the_final_layer_norm(final_layer_norm):
    """After a LayerNorm every position has nearly one norm, so the sphere only rescales; without it the sphere
    is what bounds the features (`unimodal_final_layer_norm=False`, the `mini` preset)."""
    inputs = make_inputs()
    config = tiny_config(unimodal_final_layer_norm=final_layer_norm, hidden_dropout_prob=0.0)
    model = CMALModel(config).eval()
    assert isinstance(model.visual_encoder.layer[-1].output.LayerNorm, nn.LayerNorm) is final_layer_norm
    with torch.no_grad():  # as after training: the last feed-forward no longer adds a near-zero update
        model.text_encoder.layer[-1].output.dense.weight.normal_(generator=torch.Generator().manual_seed(0))
    assert isinstance(model.text_encoder.layer[-1].attention.output.LayerNorm, nn.LayerNorm)  # only the last one goes
    torch.testing.assert_close(model(**inputs).text_features.norm(dim=-1), torch.full((3, 8), config.hypersphere_init_scale))
    plain = CMALModel(tiny_config(unimodal_final_layer_norm=final_layer_norm, hypersphere=False, hidden_dropout_prob=0.0))
    plain.load_state_dict(model.state_dict(), strict=False)
    norms = plain.eval()(**inputs).text_features.norm(dim=-1)
    spread = (norms.std() / norms.mean()).item()
    assert spread < 0.01 if final_layer_norm else spread > 0.05


# ------------------------------------------------------------------------------------------------
# Attention backends, gradient checkpointing, padding
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", HEADS)
def test_eager_and_sdpa_agree(name):
    model_class, overrides, inputs, logits_name, _ = head_case(name)
    torch.manual_seed(0)
    eager = model_class(tiny_config(**overrides, attn_implementation="eager")).eval()
    sdpa = model_class(tiny_config(**overrides, attn_implementation="sdpa")).eval()
    sdpa.load_state_dict(eager.state_dict())
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    out_e, out_s = eager(**inputs), sdpa(**inputs)
    torch.testing.assert_close(out_s[logits_name], out_e[logits_name], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_s.loss, out_e.loss, atol=1e-5, rtol=1e-5)


def test_output_attentions_and_hidden_states():
    inputs = make_inputs()
    model = CMALModel(tiny_config(attn_implementation="sdpa")).eval()
    out = model(**inputs, output_attentions=True, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert len(out.attentions) == model.config.num_hidden_layers
    assert out.attentions[0].shape == (3, 4, 13, 13)
    # padded keys get no attention, and rows sum to one
    assert out.attentions[0][-1, :, :, 6:8].abs().max() == 0
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(3, 4, 13))
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)


@pytest.mark.parametrize("name", HEADS)
def test_gradient_checkpointing_gives_same_gradients(name):
    model_class, overrides, inputs, _, _ = head_case(name)
    torch.manual_seed(0)
    model = model_class(tiny_config(**overrides, **NO_DROPOUT)).train()
    torch.manual_seed(1)  # training draws which anchors to swap: draw the same ones in both passes
    model(**inputs).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; 5.0 has the old name only
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in model.cmal.unified_encoder.layer)
    torch.manual_seed(1)
    model(**inputs).loss.backward()
    for n, p in model.named_parameters():
        if n in reference:
            torch.testing.assert_close(p.grad, reference[n], atol=1e-6, rtol=1e-5, msg=n)


def heavily_padded(inputs: dict) -> dict:
    """More padding than `make_inputs` gives: a short first text and a second image of two regions."""
    inputs = dict(inputs)
    tokens, regions = inputs["attention_mask"].clone(), inputs["visual_attention_mask"].clone()
    tokens[0, 5:], regions[1, 2:] = 0, 0
    inputs.update(attention_mask=tokens, visual_attention_mask=regions, input_ids=inputs["input_ids"] * tokens)
    return inputs


def forward_flops(model, inputs) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs)
    return counter.get_total_flops()


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("name", HEADS)
def test_padding_free_equals_padded(name, attention):
    """`padding_free` packs the real slots: the same loss, logits (at real slots) and gradients as the padded
    path, and fewer FLOPs. NLVR2's second image has its padded region first (a hole inside the mask)."""
    model_class, overrides, inputs, logits_name, _ = head_case(name)
    if name != "nlvr2":
        inputs = heavily_padded(inputs)
    torch.manual_seed(0)
    model = model_class(tiny_config(**overrides, **NO_DROPOUT, attn_implementation=attention)).train()
    runs = {}
    for padding_free in (False, True):
        model.config.padding_free = padding_free
        model.zero_grad()
        torch.manual_seed(1)  # the same anchor draws in both runs
        outputs = model(**inputs)
        outputs.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs[padding_free] = outputs, grads, forward_flops(model, inputs)
    (padded, padded_grads, padded_flops), (packed, packed_grads, packed_flops) = runs[False], runs[True]
    torch.testing.assert_close(packed.loss, padded.loss, atol=1e-5, rtol=1e-5)
    logits, reference = packed[logits_name], padded[logits_name]
    if name == "pretraining":  # word logits: padded slots come out of a packed run as zeros
        real = inputs["attention_mask"].bool()
        logits, reference = logits[real], reference[real]
    if name == "rec":  # padded regions score -inf either way
        real = torch.isfinite(reference)
        logits, reference = logits[real], reference[real]
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    assert packed_grads.keys() == padded_grads.keys()
    for n, grad in packed_grads.items():
        torch.testing.assert_close(grad, padded_grads[n], atol=1e-5, rtol=1e-4, msg=n)
    assert packed_flops < 0.95 * padded_flops


def test_padding_free_hands_flash_the_packed_sequence():
    """Under a flash-attention implementation the packed run calls attention once per layer on one sequence with
    flash's variable-length arguments (the contract of transformers' `flash_attention_forward`); a CPU
    stand-in honouring that contract gives the padded model's outputs."""
    calls = []

    def flash_varlen_stand_in(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        cu_seqlens = kwargs["cu_seq_lens_q"]
        assert attention_mask is None and query.shape[0] == 1 and torch.equal(kwargs["cu_seq_lens_k"], cu_seqlens)
        assert kwargs["max_length_q"] == kwargs["max_length_k"] == int(cu_seqlens.diff().max())
        calls.append(cu_seqlens.tolist())
        parts = [
            F.scaled_dot_product_attention(*(x[:, :, start:end] for x in (query, key, value)), scale=scaling)
            for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())
        ]
        return torch.cat(parts, dim=2).transpose(1, 2), None  # flash's layout: (1, total, heads, head_dim)

    inputs = heavily_padded(make_inputs())
    torch.manual_seed(0)
    model = CMALModel(tiny_config(attn_implementation="eager")).eval()
    reference = model(**inputs)
    AttentionInterface.register("flash_varlen_stand_in", flash_varlen_stand_in)
    AttentionMaskInterface.register("flash_varlen_stand_in", ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"])
    model.config._attn_implementation = "flash_varlen_stand_in"
    model.config.padding_free = True
    packed = model(**inputs)
    real = torch.cat([inputs["attention_mask"], inputs["visual_attention_mask"]], dim=1).bool()
    torch.testing.assert_close(packed.last_hidden_state[real], reference.last_hidden_state[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.pooler_output, reference.pooler_output, atol=1e-5, rtol=1e-5)
    assert packed.last_hidden_state[~real].abs().max() == 0
    config = model.config
    expected = (
        [[0, 5, 13, 19]] * config.num_text_layers  # texts of 5, 8, 6 tokens
        + [[0, 5, 7, 11]] * config.num_visual_layers  # 5, 2, 4 regions
        + [[0, 10, 20, 30]] * config.num_hidden_layers
    )
    assert calls == expected


def test_padding_free_still_returns_padded_attentions_and_hidden_states():
    inputs = heavily_padded(make_inputs())
    model = CMALModel(tiny_config(attn_implementation="eager")).eval()
    reference = model(**inputs, output_attentions=True, output_hidden_states=True)
    model.config.padding_free = True
    out = model(**inputs, output_attentions=True, output_hidden_states=True)
    assert out.attentions[0].shape == (3, 4, 13, 13) and len(out.hidden_states) == model.config.num_hidden_layers + 1
    for got, expected in zip(out.hidden_states + out.attentions, reference.hidden_states + reference.attentions):
        torch.testing.assert_close(got, expected)


def test_example_alone_equals_example_in_padded_batch():
    inputs = make_inputs()
    model = CMALForQuestionAnswering(tiny_config()).eval()
    batch_logits = model(**inputs).logits
    last = {k: v[-1:, : (6 if v.shape[1] == 8 else 4)] for k, v in inputs.items()}  # strip its padding
    torch.testing.assert_close(model(**last).logits[0], batch_logits[-1], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Saving, loading, auto classes, Hub remote code
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", HEADS)
def test_save_and_load_is_exact(name, tmp_path):
    model_class, overrides, inputs, logits_name, _ = head_case(name)
    model = model_class(tiny_config(**overrides)).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "pytorch_model.bin").exists()
    loaded = model_class.from_pretrained(tmp_path).eval()
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for key in state:
        assert torch.equal(state[key], loaded_state[key]), key
    # Weights are bit-exact (above); outputs are equal up to float rounding: the loader maps tensors out of the
    # safetensors file at addresses that need not be 64-byte aligned, and CPU kernels then take another SIMD path
    # (measured: 7e-9..3e-8 apart, 0 after cloning every parameter to fresh, aligned memory).
    torch.testing.assert_close(loaded(**inputs)[logits_name], model(**inputs)[logits_name], rtol=1e-5, atol=1e-6)
    assert {**loaded.config.to_dict(), "_name_or_path": ""} == model.config.to_dict()


def test_tied_word_embeddings_survive_loading(tmp_path):
    CMALForPreTraining(tiny_config()).save_pretrained(tmp_path)
    model = CMALForPreTraining.from_pretrained(tmp_path)
    assert model.mapping_head.token_head.decoder.weight is model.cmal.text_encoder.embeddings.word_embeddings.weight


@pytest.mark.parametrize("head, reported", [
    (CMALModel, set()),  # AutoModel on a pre-training folder: every key it has is used, the heads are not its own
    (CMALForQuestionAnswering, {"classifier"}),  # fine-tuning starts: only the new head, as missing
    (CMALForImageTextRetrieval, set()),  # retrieval keeps pre-training's ITM head: nothing new
])  # fmt: skip
def test_loading_a_pretraining_folder_reports_only_new_weights(head, reported, tmp_path):
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging as hf_logging

    CMALForPreTraining(tiny_config()).save_pretrained(tmp_path)
    with CaptureLogger(hf_logging.get_logger("transformers.modeling_utils")) as captured:
        head.from_pretrained(tmp_path, **({} if head is CMALModel else {"id2label": {0: "no match", 1: "match"}}))
    assert "UNEXPECTED" not in captured.out  # the pre-training heads are declared (`_keys_to_ignore_on_load_unexpected`)
    assert {row.split(".")[0] for row in re.findall(r"^([^|\n]+?) *\| MISSING", captured.out, re.M)} == reported
    assert ("LOAD REPORT" in captured.out) == bool(reported)


def test_local_auto_classes():
    config = tiny_config()
    assert isinstance(AutoConfig.for_model("cmal"), CMALConfig)
    assert type(AutoModel.from_config(config)) is CMALModel
    assert type(AutoModelForPreTraining.from_config(config)) is CMALForPreTraining
    assert type(AutoModelForVisualQuestionAnswering.from_config(config)) is CMALForQuestionAnswering


def test_auto_map_names_local_files(tmp_path):
    CMALForReferringExpression(tiny_config()).save_pretrained(tmp_path)
    config = CMALConfig.from_pretrained(tmp_path)
    assert config.auto_map == {
        "AutoConfig": "configuration_cmal.CMALConfig",
        "AutoModel": "modeling_cmal.CMALModel",
        "AutoModelForPreTraining": "modeling_cmal.CMALForPreTraining",
        "AutoModelForVisualQuestionAnswering": "modeling_cmal.CMALForQuestionAnswering",
        "AutoModelForSequenceClassification": "modeling_cmal.CMALForImageTextClassification",
        "AutoModelForTokenClassification": "modeling_cmal.CMALForReferringExpression",
    }
    assert config.custom_pipelines == {
        "referring-expression": {
            "impl": "pipeline_cmal.CMALReferringExpressionPipeline",
            "pt": ["AutoModelForTokenClassification"],
            "type": "multimodal",
        }
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", "configuration_cmal.py", "legacy_cmal.py", "model.safetensors", "modeling_cmal.py",
        "pipeline_cmal.py", "validation_cmal.py",
    ]  # fmt: skip


REMOTE_LOAD = """
import inspect, json, sys
import torch
from torch import nn
from transformers import AutoModel, AutoModelForVisualQuestionAnswering

folder = sys.argv[1]
vqa = AutoModelForVisualQuestionAnswering.from_pretrained(folder, trust_remote_code=True).eval()
encoder = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
inputs = {k: torch.tensor(v) for k, v in json.load(open(folder + "/inputs.json")).items()}
try:  # the checks at the boundary come from the folder's validation_cmal.py
    vqa(**{**inputs, "input_ids": inputs["input_ids"] + 10**6})
    refused = None
except ValueError as error:
    refused = str(error)
print(json.dumps({
    "vqa_class": type(vqa).__module__ + "." + type(vqa).__name__,
    "encoder_class": type(encoder).__name__,
    "source": inspect.getfile(type(vqa)),
    "logits": vqa(**inputs).logits.tolist(),
    "modules": sorted(name.rsplit(".", 1)[1] for name in sys.modules if name.startswith("transformers_modules.")),
    "refused": refused,
}))
"""


def test_remote_code_load_in_clean_process(tmp_path):
    """A saved folder loads with trust_remote_code where the project cannot be imported."""
    folder = tmp_path / "vqa"
    _, overrides, inputs, _, _ = head_case("vqa")
    inputs.pop("labels")
    model = CMALForQuestionAnswering(tiny_config(**overrides)).eval()
    model.save_pretrained(folder)
    (folder / "inputs.json").write_text(json.dumps({k: v.tolist() for k, v in inputs.items()}))
    report = run_without_project(REMOTE_LOAD, folder, tmp_path)
    assert report["vqa_class"].startswith("transformers_modules.")
    assert report["vqa_class"].endswith("modeling_cmal.CMALForQuestionAnswering")
    assert report["encoder_class"] == "CMALModel"
    assert Path(report["source"]).is_relative_to(tmp_path / "modules")
    assert Path(report["source"]).read_text() == (folder / "modeling_cmal.py").read_text()
    # the model file's siblings travel with every saved folder and load from it
    assert {"configuration_cmal", "validation_cmal", "legacy_cmal"} <= set(report["modules"])
    assert all((folder / f"{name}.py").is_file() for name in ("validation_cmal", "legacy_cmal"))
    assert report["refused"] and "`input_ids`" in report["refused"]
    torch.testing.assert_close(torch.tensor(report["logits"]), model(**inputs).logits, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


def test_presets():
    base = CMALConfig.from_preset("base")
    assert (base.hidden_size, base.num_attention_heads) == (768, 12)
    assert base.num_text_layers + base.num_hidden_layers == 12  # BERT-base depth along the text path
    assert set(CMAL_PRESETS) == {"tiny", "mini", "small", "base"}
    assert CMALConfig.from_preset("tiny", hidden_size=64).hidden_size == 64
    with pytest.raises(ValueError, match=r"`name` must be one of \['base', 'mini', 'small', 'tiny'\], got 'huge'"):
        CMALConfig.from_preset("huge")


def test_default_concepts_are_coco():
    config = CMALConfig()
    assert config.num_concepts == 80 and config.concept_names[9] == "traffic light"
    assert CMALConfig(num_concepts=3).concept_names == ["concept_0", "concept_1", "concept_2"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_concepts=3, concept_names=["a", "b"]), r"`num_concepts` \(3\) must equal len\(`concept_names`\) \(2\)"),
        (dict(concept_names=["a", "a"]), "`concept_names` must not repeat a name"),
        (dict(hidden_size=30, num_attention_heads=4), r"`hidden_size` \(30\) must be a multiple of `num_attention_heads` \(4\)"),
        (dict(anchor_mask_prob=1.5), r"`anchor_mask_prob` must be a number in \[0, 1\], got 1.5"),
        (dict(num_hidden_layers=0), r"`num_hidden_layers` must be an integer in \[1, inf\), got 0"),
        (dict(num_text_layers=-1), r"`num_text_layers` must be an integer in \[0, inf\), got -1"),
        (dict(itc_temperature=0.0), r"`itc_temperature` must be a number in \[0.001, 0.5\], got 0.0"),
        (dict(itc_projection_dim=0), r"`itc_projection_dim` must be an integer in \[1, inf\), got 0"),
        (dict(anchor_fill="zero"), "`anchor_fill` must be 'swap' or 'mask', got 'zero'"),
        (dict(padding_free="yes"), "`padding_free` must be true or false, got 'yes'"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CMALConfig(**kwargs)


def test_config_round_trip(tmp_path):
    config = tiny_config(concept_names=[f"thing {i}" for i in range(NUM_CONCEPTS)], itc_weight=0.5)
    config.save_pretrained(tmp_path)
    loaded = CMALConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.concept_names[3] == "thing 3" and loaded.itc_weight == 0.5


def test_heads_start_from_a_pretraining_checkpoint(tmp_path):
    """Fine-tuning starts here: the encoder loads exactly, the ITM head carries over to retrieval, new heads init."""
    pretrained = CMALForPreTraining(tiny_config())
    with torch.no_grad():
        pretrained.cmal.text_encoder.hypersphere.scale.fill_(3.0)
    pretrained.save_pretrained(tmp_path)
    retrieval = CMALForImageTextRetrieval.from_pretrained(tmp_path)
    for name, tensor in pretrained.cmal.state_dict().items():
        assert torch.equal(retrieval.cmal.state_dict()[name], tensor), name
    assert torch.equal(retrieval.itm_head.weight, pretrained.itm_head.weight)
    assert retrieval.cmal.text_encoder.hypersphere.scale.item() == 3.0
    vqa = CMALForQuestionAnswering.from_pretrained(tmp_path, id2label={i: str(i) for i in range(7)})
    head = vqa.classifier[3].weight
    assert head.shape == (7, 64) and torch.isfinite(head).all()
    assert 0.01 < head.std().item() < 0.03  # normal(0, initializer_range=0.02), not garbage
    assert torch.equal(vqa.classifier[1].weight, torch.ones(64))


def test_bfloat16_forward_backward():
    model_class, overrides, inputs, logits_name, shape = head_case("pretraining")
    model = model_class(tiny_config(**overrides)).to(torch.bfloat16).train()
    out = model(**inputs)  # float32 features are cast to the model's dtype
    assert out[logits_name].dtype == torch.bfloat16 and out[logits_name].shape == shape
    assert torch.isfinite(out.loss)
    out.loss.backward()


LEGACY_KEYS = json.loads((Path(__file__).parent / "fixtures" / "checkpoint_keys_v0.json").read_text())


@pytest.mark.parametrize("class_name", [name for name in LEGACY_KEYS if not name.startswith("_")])
def test_checkpoint_of_the_old_layout_loads(class_name, tmp_path):
    """A folder with the parameter names CMAL saved before its named units (the fixture lists them, taken from a
    save by that code, with 0-d hypersphere radii) loads every tensor into the unit that now holds it, and is
    re-saved in today's layout, which loads the same."""
    import cmal
    from safetensors.torch import save_file

    model_class = getattr(cmal, class_name)
    generator = torch.Generator().manual_seed(0)
    old = {name: torch.randn(shape, generator=generator) for name, shape in LEGACY_KEYS[class_name].items()}
    save_file(old, tmp_path / "model.safetensors", metadata={"format": "pt"})
    labels = {0: "no match", 1: "match"} if class_name == "CMALForImageTextRetrieval" else {0: "a", 1: "b", 2: "c"}
    tiny_config(id2label=labels).save_pretrained(tmp_path)
    model, info = model_class.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    # only the parameter added since is new: the masked-region embedding (ITC's projections exist with ITC on)
    prefix = "" if class_name == "CMALModel" else "cmal."
    added = {f"{prefix}visual_encoder.embeddings.mask_embedding"}
    assert set(info["missing_keys"]) == added

    new = model.state_dict()
    # old name -> the new names holding its values (tied parameters hold one tensor under two names)
    renamed = {old_name: {name for name in new if new[name].numel() == value.numel()
                          and torch.equal(new[name].reshape(value.shape), value)}
               for old_name, value in old.items()}  # fmt: skip
    assert all(renamed.values())  # every saved tensor reached the model
    word_embeddings = next(name for name in old if name.endswith("text_embeddings.word_embeddings.weight"))
    assert any(name.endswith("text_encoder.embeddings.word_embeddings.weight") for name in renamed[word_embeddings])
    if class_name == "CMALForPreTraining":
        assert renamed["pointer_head.query.weight"] == {"mapping_head.pointer_head.query.weight"}
        assert renamed["cmal.encoder.layer.1.output.dense.weight"] == {"cmal.unified_encoder.layer.1.output.dense.weight"}
        assert model.mapping_head.token_head.decoder.weight is model.cmal.text_encoder.embeddings.word_embeddings.weight

    radii = [name for name in new if name.endswith("hypersphere.scale")]
    assert len(radii) == 2 and all(new[name].shape == (1,) for name in radii)  # FSDP2 shards no 0-d tensor

    model.save_pretrained(tmp_path / "again")
    from safetensors.torch import load_file

    from modeling_cmal.modeling_cmal import LEGACY_KEY_MAPPING

    saved = load_file(tmp_path / "again" / "model.safetensors")
    assert not [key for key in saved if re.search("|".join(LEGACY_KEY_MAPPING), key)]  # today's names only
    assert all(saved[name].shape == (1,) for name in radii)
    again = model_class.from_pretrained(tmp_path / "again")
    assert all(torch.equal(again.state_dict()[name], value) for name, value in new.items())


def test_new_checkpoints_use_the_unit_names(tmp_path):
    from safetensors.torch import load_file

    CMALForPreTraining(tiny_config()).save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "cmal.text_encoder.hypersphere.scale" in keys and "mapping_head.pointer_head.key.bias" in keys
    assert not {key for key in keys if key.startswith(("lm_head.", "concept_head.", "cmal.encoder.", "cmal.text_embeddings."))}
