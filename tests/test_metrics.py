"""Local `evaluate` metrics in training/metrics, loaded by path (offline) with hand-computed expectations."""

import math

import pytest

from cmal.training.metrics import METRIC_NAMES, binary_auc, import_metric_module, load_metric


@pytest.fixture(scope="module")
def metrics():
    return {name: load_metric(name) for name in METRIC_NAMES}


@pytest.fixture(scope="module")
def vqa_module():
    return import_metric_module("vqa_accuracy")


def _answers(n_match, match="2", other="3", total=10):
    return [match] * n_match + [other] * (total - n_match)


# ----------------------------------------------------------------------------- VQA
@pytest.mark.parametrize(
    "n_match, expected",
    [
        (0, 0.0),  # no human gave it: every leave-one-out subset has 0 matches
        (1, 0.3),  # 9 subsets keep the match -> 1/3, 1 subset drops it -> 0: 9/3/10 = 0.3
        (2, 0.6),  # 8 subsets with 2 matches -> 2/3, 2 subsets with 1 -> 1/3: (16/3 + 2/3)/10 = 0.6
        (3, 0.9),  # 7 subsets with 3 -> 1, 3 subsets with 2 -> 2/3: (7 + 2)/10 = 0.9
        (4, 1.0),  # every subset keeps >= 3 matches -> 1 each
        (10, 1.0),  # all humans agree
    ],
)
def test_vqa_leave_one_out(metrics, n_match, expected):
    out = metrics["vqa_accuracy"].compute(predictions=["2"], references=[_answers(n_match)])
    assert set(out) == {"vqa_accuracy"}
    assert out["vqa_accuracy"] == pytest.approx(expected)


def test_vqa_fewer_answers_and_mean(metrics):
    # 3 answers, 2 match: subsets dropping a match have 1 -> 1/3 (twice), dropping the other has 2 -> 2/3:
    # (1/3 + 1/3 + 2/3)/3 = 4/9; second question 4 of 10 match -> 1.0; mean = (4/9 + 1)/2 = 13/18
    out = metrics["vqa_accuracy"].compute(
        predictions=["dog", "cat"], references=[["dog", "dog", "cat"], _answers(4, "cat", "dog")]
    )
    assert out["vqa_accuracy"] == pytest.approx(13 / 18)


@pytest.mark.parametrize(
    "prediction, answer",
    [
        ("Two", "2"),  # lower-case then digit word -> digit
        ("the dog.", "dog"),  # article removed, trailing period stripped
        ("isnt", "isn't"),  # contraction table
        ("A Dog!", "dog"),  # article + punctuation
        ("black-white", "black white"),  # hyphen not next to a space becomes a space
    ],
)
def test_vqa_normalisation_matches(metrics, vqa_module, prediction, answer):
    assert vqa_module.normalize_answer(prediction) == vqa_module.normalize_answer(answer)
    # 4 of 10 humans give `answer` (written differently from the prediction): full credit
    out = metrics["vqa_accuracy"].compute(predictions=[prediction], references=[_answers(4, answer, "cat")])
    assert out["vqa_accuracy"] == pytest.approx(1.0)


def test_vqa_normalize_answer_literals(vqa_module):
    norm = vqa_module.normalize_answer
    assert norm("Two") == "2"  # digit word
    assert norm("the dog.") == "dog"  # article and final period gone
    assert norm("isnt") == "isn't"  # contraction
    assert norm("1.5") == "1.5"  # period between digits kept
    assert norm("5.") == "5"  # period after a digit but not before one is stripped
    assert norm("  Yes\n") == "yes"  # whitespace and case
    assert norm("1.5") != norm("15")  # so "1.5" and "15" stay different answers


# ------------------------------------------------------------------ classification
def test_classification_accuracy(metrics):
    preds = [0, 1, 1, 2, 0]
    refs = [0, 1, 0, 2, 2]
    out = metrics["classification_accuracy"].compute(predictions=preds, references=refs)
    assert out == {"accuracy": pytest.approx(3 / 5)}  # correct at positions 0, 1, 3 -> 3/5


def test_classification_per_class(metrics):
    preds = [0, 1, 1, 2, 0]
    refs = [0, 1, 0, 2, 2]
    out = metrics["classification_accuracy"].compute(predictions=preds, references=refs, num_classes=4)
    assert out["accuracy"] == pytest.approx(0.6)  # 3 of 5 correct
    # class 0: refs at 0, 2 -> 1 of 2 right; class 1: 1 of 1; class 2: refs at 3, 4 -> 1 of 2; class 3 absent
    assert out["per_class_accuracy"] == [pytest.approx(0.5), pytest.approx(1.0), pytest.approx(0.5), None]


# ------------------------------------------------------------------------------ REC
def test_rec_iou_threshold(metrics):
    preds = [[0, 0, 10, 10]]
    refs = [[5, 0, 15, 10]]
    # overlap 5x10 = 50, union 100 + 100 - 50 = 150 -> IoU 1/3: a miss at 0.5, a hit at 0.3
    out = metrics["rec_accuracy"].compute(predictions=preds, references=refs)
    assert out["accuracy"] == 0.0
    assert out["mean_iou"] == pytest.approx(1 / 3)
    out = metrics["rec_accuracy"].compute(predictions=preds, references=refs, iou_threshold=0.3)
    assert out["accuracy"] == 1.0
    assert out["mean_iou"] == pytest.approx(1 / 3)


def test_rec_several_and_degenerate(metrics):
    preds = [
        [0, 0, 10, 10],  # identical to its reference -> IoU 1
        [0, 0, 10, 10],  # reference [0,0,10,5]: overlap 50, union 100 -> IoU 0.5 (a hit: >= 0.5)
        [3, 3, 3, 8],  # zero width -> IoU 0, not NaN
        [0.0, 0.0, 0.2, 0.2],  # normalised units, disjoint from [0.5, 0.5, 1, 1] -> IoU 0
    ]
    refs = [[0, 0, 10, 10], [0, 0, 10, 5], [0, 0, 10, 10], [0.5, 0.5, 1.0, 1.0]]
    out = metrics["rec_accuracy"].compute(predictions=preds, references=refs)
    assert out["accuracy"] == pytest.approx(0.5)  # 2 hits of 4
    assert out["mean_iou"] == pytest.approx(1.5 / 4)  # (1 + 0.5 + 0 + 0)/4
    # both boxes degenerate (zero union): IoU 0, never NaN
    out = metrics["rec_accuracy"].compute(predictions=[[1, 1, 1, 1]], references=[[1, 1, 1, 1]])
    assert out == {"accuracy": 0.0, "mean_iou": 0.0}
    assert not math.isnan(out["mean_iou"])


# ------------------------------------------------------------------------ retrieval
# 4 texts x 2 images; texts 0, 1 describe image 0 and texts 2, 3 image 1.
SCORES = [
    [0.9, 0.1],  # text 0: image 0 ranked 1st -> t2i hit at 1
    [0.2, 0.6],  # text 1: image 0 ranked 2nd -> miss at 1, hit at 2
    [0.3, 0.7],  # text 2: image 1 ranked 1st -> hit at 1
    [0.6, 0.4],  # text 3: image 1 ranked 2nd -> miss at 1, hit at 2
]
GT_IMAGE = [0, 0, 1, 1]


def test_retrieval_default_ks(metrics):
    out = metrics["retrieval_recall"].compute(predictions=SCORES, references=GT_IMAGE)
    expected = {
        "text_to_image_r1": 50.0,  # texts 0 and 2 of 4 have their image first
        "text_to_image_r5": 100.0,  # only 2 images: always within the top 5
        "text_to_image_r10": 100.0,
        # image 0 column [0.9, 0.2, 0.3, 0.6] -> top text 0 (its own): hit;
        # image 1 column [0.1, 0.6, 0.7, 0.4] -> top text 2 (its own): hit -> 2 of 2
        "image_to_text_r1": 100.0,
        "image_to_text_r5": 100.0,
        "image_to_text_r10": 100.0,
        "rsum": 550.0,  # 50 + 100 + 100 + 100 + 100 + 100
    }
    assert out.keys() == expected.keys()
    for key, value in expected.items():
        assert out[key] == pytest.approx(value), key


def test_retrieval_image_to_text_any_caption(metrics):
    # Same matrix, but image 1's column is now led by text 1 (an image-0 caption):
    # column 1 = [0.1, 0.8, 0.7, 0.4] -> top-1 is text 1 (miss), top-2 adds text 2 (its own) -> hit at 2.
    scores = [row[:] for row in SCORES]
    scores[1][1] = 0.8
    out = metrics["retrieval_recall"].compute(predictions=scores, references=GT_IMAGE, ks=(1, 2))
    assert out == {
        "text_to_image_r1": pytest.approx(50.0),  # rows unchanged in order: texts 0 and 2 hit
        "text_to_image_r2": pytest.approx(100.0),  # 2 images, all within top 2
        "image_to_text_r1": pytest.approx(50.0),  # image 0 hit (text 0), image 1 miss (text 1 first)
        "image_to_text_r2": pytest.approx(100.0),  # image 1's own text 2 is 2nd
        "rsum": pytest.approx(300.0),  # 50 + 100 + 50 + 100
    }


def test_load_metric_rejects_unknown():
    with pytest.raises(ValueError):
        load_metric("bleu")


@pytest.mark.parametrize(
    "scores, labels, auc",
    [
        ([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0], 1.0),  # every positive above every negative
        ([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0], 0.0),
        ([0.5, 0.5, 0.5, 0.5], [1, 0, 1, 0], 0.5),  # all tied: half
        ([0.9, 0.3, 0.6, 0.1], [1, 1, 0, 0], 0.75),  # 3 of the 4 positive-negative pairs ordered right
        ([0.7, 0.4, 0.4, 0.1], [1, 1, 0, 0], 0.875),  # one tied pair counts half
    ],
)
def test_binary_auc_on_hand_computed_values(scores, labels, auc):
    assert binary_auc(scores, labels) == pytest.approx(auc)


def test_binary_auc_needs_both_classes():
    assert math.isnan(binary_auc([0.3, 0.4], [1, 1]))
