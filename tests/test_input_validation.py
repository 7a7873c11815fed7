"""Bad input gets a ValueError naming the argument, the expected and the received value."""

import pytest
import torch
from conftest import FEAT_DIM, NUM_CONCEPTS, make_inputs, tiny_config

from cmal.modeling_cmal import CMALForPreTraining, CMALForQuestionAnswering, CMALForReferringExpression, CMALModel


@pytest.fixture(scope="module")
def model():
    return CMALModel(tiny_config()).eval()


def with_nan(tensor, value=float("nan")):
    tensor = tensor.clone()
    tensor[1, 2, 3] = value
    return tensor


# (name, change to the inputs, message pattern)
BAD_INPUTS = [
    ("input_ids rank", lambda x: x.update(input_ids=x["input_ids"][0]),
     r"`input_ids` must have shape \(batch_size, text_len\), got shape \(8,\)"),
    ("input_ids float", lambda x: x.update(input_ids=x["input_ids"].float()),
     r"`input_ids` must be an integer tensor, got dtype torch.float32"),
    ("input_ids out of vocabulary", lambda x: x["input_ids"].__setitem__((0, 1), 500),
     r"`input_ids` values must lie in \[0, 99\) \(config.vocab_size\), got range \[0, 500\]"),
    ("empty text", lambda x: x.update(input_ids=x["input_ids"][:, :0], attention_mask=None, token_concept_ids=None),
     r"`input_ids` is empty \(text_len 0\)"),
    ("all tokens masked", lambda x: x["attention_mask"].__setitem__(1, 0),
     r"`attention_mask` masks every token of example 1: the text is empty"),
    ("text too long", lambda x: x.update(input_ids=torch.ones(3, 200, dtype=torch.long), attention_mask=None, token_concept_ids=None),
     r"`input_ids` has 200 tokens, more than config.max_position_embeddings \(128\)"),
    ("attention_mask shape", lambda x: x.update(attention_mask=x["attention_mask"][:, :5]),
     r"`attention_mask` must have shape \(batch_size, text_len\) = \(3, 8\) .* got shape \(3, 5\)"),
    ("visual_feats rank", lambda x: x.update(visual_feats=x["visual_feats"][0]),
     rf"`visual_feats` must have shape \(batch_size, num_regions, {FEAT_DIM}\), got shape \(5, {FEAT_DIM}\)"),
    ("feature dim", lambda x: x.update(visual_feats=torch.randn(3, 5, 2048)),
     rf"`visual_feats` must have shape \(batch_size, num_regions, config.visual_feat_dim\) = \(3, 5, {FEAT_DIM}\) .* got shape \(3, 5, 2048\)"),
    ("box dim", lambda x: x.update(visual_pos=x["visual_pos"][..., :4]),
     r"`visual_pos` must have shape \(batch_size, num_regions, config.visual_pos_dim\) = \(3, 5, 7\) .* got shape \(3, 5, 4\)"),
    ("batch size mismatch", lambda x: x.update(visual_feats=x["visual_feats"][:2]),
     rf"`visual_feats` must have shape \(batch_size, num_regions, config.visual_feat_dim\) = \(3, 5, {FEAT_DIM}\) .* got shape \(2, 5, {FEAT_DIM}\)"),
    ("region count mismatch", lambda x: x.update(visual_pos=x["visual_pos"][:, :4]),
     r"`visual_pos` must have shape .* = \(3, 5, 7\) .* got shape \(3, 4, 7\)"),
    ("visual_attention_mask shape", lambda x: x.update(visual_attention_mask=x["visual_attention_mask"][:, :3]),
     r"`visual_attention_mask` must have shape \(batch_size, num_regions\) = \(3, 5\) .* got shape \(3, 3\)"),
    ("NaN feature", lambda x: x.update(visual_feats=with_nan(x["visual_feats"])),
     r"`visual_feats` must be finite, got NaN or inf \(first at index \(1, 2, 3\)\)"),
    ("inf box", lambda x: x.update(visual_pos=with_nan(x["visual_pos"], float("inf"))),
     r"`visual_pos` must be finite, got NaN or inf \(first at index \(1, 2, 3\)\)"),
    ("pixel boxes", lambda x: x.update(visual_pos=x["visual_pos"] * 640),
     r"`visual_pos` boxes must be normalised \(x1, y1, x2, y2\) in \[0, 1\] with x2 >= x1 and y2 >= y1, got \[.*\] at example 0, region 0"),
    ("x2 < x1", lambda x: x["visual_pos"][2, 3, :4].copy_(torch.tensor([0.6, 0.1, 0.2, 0.5])),
     r"`visual_pos` boxes must be normalised .* got \[0.6, 0.1, 0.2, 0.5\] at example 2, region 3"),
    ("y2 < y1", lambda x: x["visual_pos"][1, 0, :4].copy_(torch.tensor([0.1, 0.9, 0.2, 0.5])),
     r"`visual_pos` boxes must be normalised .* got \[0.1, 0.9, 0.2, 0.5\] at example 1, region 0"),
    ("negative box", lambda x: x["visual_pos"][0, 1, :4].copy_(torch.tensor([-0.2, 0.1, 0.2, 0.5])),
     r"`visual_pos` boxes must be normalised .* got \[-0.2, 0.1, 0.2, 0.5\] at example 0, region 1"),
    ("integer features", lambda x: x.update(visual_feats=x["visual_feats"].long()),
     r"`visual_feats` must be a floating-point tensor, got dtype torch.int64"),
    ("features not a tensor", lambda x: x.update(visual_feats=x["visual_feats"].tolist()),
     r"`visual_feats` must be a torch.Tensor, got list"),
    ("too many regions", lambda x: x.update(visual_feats=torch.randn(3, 51, FEAT_DIM), visual_pos=torch.rand(3, 51, 7),
                                            visual_attention_mask=None, region_concept_ids=None),
     r"`visual_feats` has 51 regions, more than config.max_regions \(50\)"),
    ("token concept too large", lambda x: x["token_concept_ids"].__setitem__((0, 2), NUM_CONCEPTS),
     rf"`token_concept_ids` values must be -1 \(no concept\) or lie in \[0, {NUM_CONCEPTS}\) \(config.num_concepts\), got range \[-1, {NUM_CONCEPTS}\]"),
    ("region concept negative", lambda x: x["region_concept_ids"].__setitem__((0, 2), -5),
     r"`region_concept_ids` values must be -1 \(no concept\) or lie in \[0, 10\) .* got range \[-5, \d\]"),
    ("region_scores NaN", lambda x: x.update(region_scores=torch.tensor([[0.5, float("nan"), 1, 1, 1]] * 3)),
     r"`region_scores` must be finite, got NaN or inf \(first at index \(0, 1\)\)"),
    ("token_type_ids out of range", lambda x: x.update(token_type_ids=torch.full((3, 8), 2)),
     r"`token_type_ids` values must lie in \[0, 2\) \(config.type_vocab_size\), got range \[2, 2\]"),
    ("anchor_selection shape", lambda x: x.update(anchor_selection=torch.ones(3, 4, dtype=torch.bool)),
     r"`anchor_selection` must have shape \(batch_size, config.num_concepts\) = \(3, 10\) .* got shape \(3, 4\)"),
]  # fmt: skip


@pytest.mark.parametrize("change, message", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_raises_a_clear_error(model, change, message):
    inputs = make_inputs()
    change(inputs)
    with pytest.raises(ValueError, match=message):
        model(**inputs)


def test_unknown_argument_is_named(model):
    with pytest.raises(TypeError, match=r"unexpected arguments \['pixel_mask'\]"):
        model(**make_inputs(), pixel_mask=torch.ones(1))


@pytest.mark.parametrize(
    "head, labels, message",
    [
        (CMALForQuestionAnswering, torch.zeros(3, 5), r"`labels` must have shape \(3, 2\), got shape \(3, 5\)"),
        (CMALForQuestionAnswering, torch.full((3, 2), 2.0), r"`labels` must lie in \[0, 1\], got range \[2, 2\]"),
        (CMALForQuestionAnswering, torch.ones(3, 2, dtype=torch.long), r"`labels` must be finite floating-point scores"),
        (CMALForReferringExpression, torch.tensor([0, 1, 7]), r"`labels` values must lie in \[0, 5\) .* got range \[0, 7\]"),
        (CMALForReferringExpression, torch.tensor([0, 1, 4]), r"`labels` must point at a real region"),
        (CMALForPreTraining, torch.zeros(3, 5, dtype=torch.long), r"`labels` must have shape \(3, 8\), got shape \(3, 5\)"),
    ],
)
def test_bad_labels_raise_a_clear_error(head, labels, message):
    model = head(tiny_config()).eval()
    with pytest.raises(ValueError, match=message):
        model(**make_inputs(), labels=labels)


def test_bad_itm_labels(model):
    pretraining = CMALForPreTraining(tiny_config()).eval()
    with pytest.raises(ValueError, match=r"`itm_labels` values must lie in \[0, 2\) .* got range \[0, 3\]"):
        pretraining(**make_inputs(), itm_labels=torch.tensor([0, 1, 3]))


def test_nlvr2_needs_two_images():
    from cmal.modeling_cmal import CMALForVisualReasoning

    model = CMALForVisualReasoning(tiny_config()).eval()
    with pytest.raises(ValueError, match=r"`visual_feats` must have shape \(batch_size, 2, num_regions, visual_feat_dim\)"):
        model(**make_inputs())


# ------------------------------------------------------------------------------------------------
# Unusual but valid input works
# ------------------------------------------------------------------------------------------------


def test_zero_regions_work():
    inputs = make_inputs()
    for key in ("visual_feats", "visual_pos", "visual_attention_mask", "region_concept_ids"):
        inputs[key] = inputs[key][:, :0]
    model = CMALForPreTraining(tiny_config()).train()
    out = model(**inputs, itm_labels=torch.tensor([1, 1, 1]))
    assert out.prediction_logits.shape == (3, 8, 99) and out.pointer_logits.shape == (3, 8, 0)
    assert out.anchor_map.shape == (3, 8, 0) and not out.token_swapped.any()
    assert torch.isfinite(out.loss)
    out.loss.backward()


def test_an_example_without_real_regions_works():
    inputs = make_inputs()
    inputs["visual_attention_mask"][1] = 0
    out = CMALModel(tiny_config()).eval()(**inputs)
    assert torch.isfinite(out.last_hidden_state).all() and torch.isfinite(out.image_embeds).all()
    assert not out.anchor_map[1].any()


def test_text_without_anchors_works():
    inputs = make_inputs()
    inputs.pop("token_concept_ids")
    out = CMALModel(tiny_config(prompt_at_inference=True)).eval()(**inputs)
    assert not out.anchor_map.any() and not out.token_swapped.any() and not out.region_swapped.any()
    assert (out.token_partner == -1).all() and (out.region_partner == -1).all()


def test_only_required_inputs_work():
    inputs = make_inputs(pad=False)
    out = CMALModel(tiny_config()).eval()(inputs["input_ids"], inputs["visual_feats"], inputs["visual_pos"])
    assert out.last_hidden_state.shape == (3, 13, 32)


def test_half_precision_features_are_cast():
    inputs = make_inputs()
    inputs["visual_feats"] = inputs["visual_feats"].half()  # the feature stores keep float16
    model = CMALModel(tiny_config()).eval()
    reference = model(**make_inputs()).last_hidden_state
    torch.testing.assert_close(model(**inputs).last_hidden_state, reference, atol=1e-2, rtol=1e-2)
