"""VQA soft accuracy (official VQA v2 evaluation protocol) as a local `evaluate` metric."""

import re

import datasets
import evaluate

from cmal.training.metrics.local_metric import local_metric

_DESCRIPTION = """\
Standard VQA soft accuracy. For one question with human answers g_1..g_n and a predicted answer p
(both normalised as in the official VQA evaluation script), the score is the average over the n
leave-one-annotator-out subsets of min(#{j != i : g_j == p} / 3, 1). With the usual 10 answers this is
exactly the official metric (an answer given by >= 4 humans scores 1, by 3 humans 0.9, by 2 humans 0.6,
by 1 human 0.3). With fewer than 10 answers the same leave-one-out average is used; with a single
answer (no leave-one-out subset exists) the score is min(#matches / 3, 1). The corpus score is the mean
over questions, in [0, 1].
"""

_CITATION = """\
@inproceedings{antol2015vqa,
  title={{VQA}: Visual Question Answering},
  author={Antol, Stanislaw and Agrawal, Aishwarya and Lu, Jiasen and Mitchell, Margaret and Batra, Dhruv and Zitnick, C. Lawrence and Parikh, Devi},
  booktitle={ICCV},
  year={2015}
}
@inproceedings{goyal2017making,
  title={Making the {V} in {VQA} Matter: Elevating the Role of Image Understanding in Visual Question Answering},
  author={Goyal, Yash and Khot, Tejas and Summers-Stay, Douglas and Batra, Dhruv and Parikh, Devi},
  booktitle={CVPR},
  year={2017}
}
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list` of `str`): one predicted answer per question.
    references (`list` of `list` of `str`): the human answers for each question (usually 10).
Returns:
    vqa_accuracy (`float`): mean soft accuracy over questions, in [0, 1].
Examples:
    >>> metric = evaluate.load("training/metrics/vqa_accuracy")
    >>> metric.compute(predictions=["2"], references=[["two"] * 10])
    {'vqa_accuracy': 1.0}
"""

# Subset of the official contraction table (keys are forms without apostrophes).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "hed": "he'd",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "isnt": "isn't", "itd": "it'd", "itll": "it'll",
    "maam": "ma'am", "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "shant": "shan't",
    "shed": "she'd", "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "somebodys": "somebody's", "someones": "someone's", "somethings": "something's", "thats": "that's",
    "thered": "there'd", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "wasnt": "wasn't",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
# Official digit map ("none" -> "0" as in the VQA script).
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# A period is kept only when it sits between two digits ("1.5"); otherwise it is removed.
_PERIOD_STRIP = re.compile(r"(?<!\d)\.|\.(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text):
    out = text
    for p in PUNCTUATION:
        # As in the official script: a punctuation mark next to a space (or any digit,digit comma in the
        # answer) is deleted, otherwise it is replaced by a space ("black-white" -> "black white").
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text):
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text):
    """Official VQA answer normalisation (punctuation, digit words, articles, contractions)."""
    text = str(text).replace("\n", " ").replace("\t", " ").strip().lower()
    return _process_digit_article(_process_punctuation(text))


def vqa_soft_score(prediction, answers):
    """Leave-one-annotator-out soft accuracy of one (already normalised) prediction."""
    n = len(answers)
    if n == 0:
        return 0.0
    matches = sum(1 for a in answers if a == prediction)
    if n == 1:
        return min(matches / 3.0, 1.0)
    total = 0.0
    for a in answers:
        others = matches - (1 if a == prediction else 0)
        total += min(others / 3.0, 1.0)
    return total / n


@local_metric(_DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION, predictions=datasets.Value("string"), references=datasets.Sequence(datasets.Value("string")),
              reference_urls=["https://github.com/GT-Vision-Lab/VQA/blob/master/PythonEvaluationTools/vqaEvaluation/vqaEval.py"])
class VqaAccuracy(evaluate.Metric):
    def _compute(self, predictions, references):
        if len(predictions) == 0:
            return {"vqa_accuracy": 0.0}
        scores = [
            vqa_soft_score(normalize_answer(p), [normalize_answer(a) for a in refs])
            for p, refs in zip(predictions, references)
        ]
        return {"vqa_accuracy": float(sum(scores) / len(scores))}
