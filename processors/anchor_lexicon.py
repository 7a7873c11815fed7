# Copyright 2026 The CMAL authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""The anchor lexicon: which words of a text name which detected concept.

CMAL's anchor points are concepts seen both as a region tag and as a word, so the processor needs
each text token's concept id. This module ships as Hub remote code next to `processing_cmal.py`
and imports only the standard library, so it loads wherever the processor does.
"""

import functools
import json
import os
from collections.abc import Sequence


# Synonyms for the COCO names: the words captions actually use for a class. Words that often name
# something else are left out on purpose: "bag" (backpack, suitcase, shopping bag), "bat" (the
# animal), "glass" (windows, cups), "baby" and "adult" ("a baby elephant"), "computer", "monitor".
# No phrase is listed for two classes, so the table never clashes with itself.
DEFAULT_SYNONYMS: dict[str, list[str]] = {
    "person": [
        "man", "woman", "boy", "girl", "child", "kid", "guy", "lady", "gentleman", "human",
        "teenager", "toddler", "pedestrian", "skier", "surfer", "skateboarder", "snowboarder",
    ],
    "bicycle": ["bike"],
    "car": ["automobile", "sedan"],
    "motorcycle": ["motorbike", "motor bike"],
    "airplane": ["plane", "aeroplane", "jet", "airliner", "jetliner", "aircraft"],
    "train": ["locomotive"],
    "truck": ["lorry"],
    "boat": ["ship", "sailboat", "yacht", "canoe", "kayak"],
    "fire hydrant": ["hydrant"],
    "bird": ["pigeon", "seagull", "parrot"],
    "cat": ["kitten", "kitty"],
    "dog": ["puppy"],
    "horse": ["pony", "foal"],
    "cow": ["cattle", "bull"],
    "backpack": ["rucksack", "knapsack"],
    "umbrella": ["parasol"],
    "handbag": ["purse", "hand bag"],
    "tie": ["necktie"],
    "suitcase": ["luggage"],
    "frisbee": ["flying disc"],
    "skis": ["ski"],
    "sports ball": ["ball", "soccer ball", "tennis ball"],
    "baseball glove": ["mitt", "baseball mitt"],
    "skateboard": ["skate board"],
    "surfboard": ["surf board"],
    "tennis racket": ["racket", "racquet", "tennis racquet"],
    "wine glass": ["wineglass"],
    "cup": ["mug"],
    "hot dog": ["hotdog", "hot-dog"],
    "donut": ["doughnut"],
    "couch": ["sofa"],
    "potted plant": ["plant", "houseplant", "house plant"],
    "dining table": ["table"],
    "tv": ["television", "tv set", "television set"],
    "laptop": ["notebook computer", "laptop computer"],
    "mouse": ["computer mouse"],
    "remote": ["remote control"],
    "cell phone": ["phone", "mobile phone", "cellphone", "smartphone"],
    "microwave": ["microwave oven"],  # otherwise "oven" would tag the microwave as an oven
    "oven": ["stove"],
    "refrigerator": ["fridge"],
    "teddy bear": ["teddy", "stuffed animal"],
    "hair drier": ["hair dryer", "hairdryer", "blow dryer"],
    "toothbrush": ["tooth brush"],
}  # fmt: skip

_IRREGULAR_PLURALS = {
    "person": "people", "man": "men", "woman": "women", "gentleman": "gentlemen",
    "child": "children", "mouse": "mice", "foot": "feet", "tooth": "teeth", "goose": "geese",
}  # fmt: skip
# Words whose plural is the word itself: same-form plurals, uncountables, and words already plural
# (so "people" does not become "peoples").
_INVARIANT = {
    "sheep", "fish", "deer", "moose", "bison", "aircraft", "series", "species", "cattle",
    "luggage", "broccoli", "skis", "scissors", "glasses", "pants", "jeans", "shorts", "trousers",
    *_IRREGULAR_PLURALS.values(),
}  # fmt: skip
_F_TO_VES = {
    "knife": "knives", "wife": "wives", "life": "lives", "leaf": "leaves", "loaf": "loaves",
    "shelf": "shelves", "wolf": "wolves", "calf": "calves", "half": "halves", "thief": "thieves",
    "elf": "elves",
}  # fmt: skip
_O_TO_OES = {"potato", "tomato", "hero", "echo"}

# Who wins when two concepts claim one phrase: a lower tier always wins; the same tier is an error.
_NAME, _USER, _DEFAULT = 0, 1, 2


@functools.lru_cache(maxsize=65536)  # a corpus repeats its words: the anchor lookup normalises each word once
def _normalize(phrase: str) -> str:
    """Lower-case and collapse whitespace, so "Traffic  Light" and "traffic light" are one phrase."""
    return " ".join(phrase.lower().split())


def pluralize(phrase: str) -> str:
    """English plural of a normalised phrase, made on its last word ("traffic light" -> "traffic lights")."""
    head, _, word = phrase.rpartition(" ")
    if word in _INVARIANT:
        plural = word
    elif word in _IRREGULAR_PLURALS:
        plural = _IRREGULAR_PLURALS[word]
    elif word in _F_TO_VES:
        plural = _F_TO_VES[word]
    elif word.endswith(("s", "x", "z", "ch", "sh")) or word in _O_TO_OES:
        plural = word + "es"
    elif len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        plural = word[:-1] + "ies"
    else:
        plural = word + "s"
    return f"{head} {plural}" if head else plural


class AnchorLexicon:
    """Maps words of a text to concept ids, so that each token knows which region tag it names.

    The phrase table holds each concept name, its synonyms and (with `plurals`) the plural of each.
    When two concepts claim one phrase, a concept's own name wins over anything derived, user
    synonyms and plurals of names win over the built-in defaults, and a tie within one of these
    tiers raises, since a silent pick would mislabel anchors.

    Args:
        concept_names (`list[str]`): the concept vocabulary; concept id = index in this list.
        synonyms (`dict[str, list[str]]`, *optional*): extra phrases per concept name. A concept
            given here uses these instead of its built-in defaults (`[]` drops them).
        plurals (`bool`, defaults to `True`): also match the plural of every phrase.
        default_synonyms (`bool`, defaults to `True`): merge `DEFAULT_SYNONYMS` for the COCO names
            present in `concept_names`.
    """

    def __init__(
        self,
        concept_names: list[str],
        synonyms: dict[str, list[str]] | None = None,
        plurals: bool = True,
        default_synonyms: bool = True,
    ):
        if isinstance(concept_names, str) or not isinstance(concept_names, Sequence) or not concept_names:
            raise ValueError(f"`concept_names` must be a non-empty list of strings, got {concept_names!r}")
        normalized_names = []
        for index, name in enumerate(concept_names):
            if not isinstance(name, str) or not _normalize(name):
                raise ValueError(f"`concept_names` must hold non-empty strings, got {name!r} at index {index}")
            key = _normalize(name)
            if key in normalized_names:
                first = concept_names[normalized_names.index(key)]
                raise ValueError(f"`concept_names` repeats a name: {first!r} and {name!r} at index {index}")
            normalized_names.append(key)
        synonyms = {} if synonyms is None else synonyms
        if not isinstance(synonyms, dict):
            raise ValueError(f"`synonyms` must be a dict from concept name to a list of phrases, got {synonyms!r}")
        for name, phrases in synonyms.items():
            if name not in concept_names:
                raise ValueError(f"`synonyms` key {name!r} is not in `concept_names`")
            if isinstance(phrases, str) or not isinstance(phrases, Sequence):
                raise ValueError(f"`synonyms[{name!r}]` must be a list of phrases, got {phrases!r}")
            for phrase in phrases:
                if not isinstance(phrase, str) or not _normalize(phrase):
                    raise ValueError(f"`synonyms[{name!r}]` must hold non-empty strings, got {phrase!r}")

        self.concept_names = list(concept_names)
        self.synonyms = {name: list(phrases) for name, phrases in synonyms.items()}
        self.plurals = bool(plurals)
        self.default_synonyms = bool(default_synonyms)

        # (tier, phrase, concept id), added tier by tier so that the outcome never depends on order.
        entries = [(_NAME, key, cid) for cid, key in enumerate(normalized_names)]
        for cid, (name, key) in enumerate(zip(self.concept_names, normalized_names)):
            if name in self.synonyms:
                entries += [(_USER, _normalize(phrase), cid) for phrase in self.synonyms[name]]
            elif self.default_synonyms:
                entries += [(_DEFAULT, phrase, cid) for phrase in DEFAULT_SYNONYMS.get(key, [])]
        if self.plurals:
            entries += [(max(tier, _USER), pluralize(phrase), cid) for tier, phrase, cid in entries]

        self.phrases: dict[str, int] = {}
        tiers: dict[str, int] = {}
        for tier, phrase, cid in sorted(entries, key=lambda entry: entry[0]):
            if phrase not in self.phrases:
                self.phrases[phrase], tiers[phrase] = cid, tier
            elif tiers[phrase] == tier and self.phrases[phrase] != cid:
                raise ValueError(
                    f"Anchor phrase {phrase!r} maps to two concepts: "
                    f"{self.concept_names[self.phrases[phrase]]!r} and {self.concept_names[cid]!r}"
                )
        # Every prefix of every phrase: a span whose text is none of them cannot grow into a match (a longer
        # span's normalised text starts with this one's), so most words are passed over at their first lookup.
        self._prefixes = {phrase[:end] for phrase in self.phrases for end in range(len(phrase) + 1)}

    def concept_of(self, phrase: str) -> int:
        """Concept id of `phrase` (any case and spacing), or -1 when it names no concept."""
        return self.phrases.get(_normalize(phrase), -1)

    def token_concept_ids(
        self, text: str, offsets: Sequence[Sequence[int]], word_ids: Sequence[int | None]
    ) -> list[int]:
        """Concept id of every token of one encoded `text` (-1 for none), from a fast tokenizer's output.

        `offsets` and `word_ids` are the encoding's character offsets and word ids (`None` for special
        and padding tokens). A word's string is the text under its pieces, so the lexicon works with
        any tokenizer's word pieces. Words match greedily from the left, longest phrase first ("hot
        dog" before "dog"), and every piece of a matched word gets the concept id.
        """
        if len(offsets) != len(word_ids):
            raise ValueError(
                f"`offsets` and `word_ids` must have the same length, got {len(offsets)} and {len(word_ids)}"
            )
        # A word is a run of consecutive tokens sharing a word id: [start char, end char, token indices].
        words: list[list] = []
        previous = None
        for index, word_id in enumerate(word_ids):
            if word_id is None:
                previous = None
            elif word_id == previous:
                words[-1][1] = offsets[index][1]
                words[-1][2].append(index)
            else:
                words.append([offsets[index][0], offsets[index][1], [index]])
                previous = word_id

        concept_ids = [-1] * len(word_ids)
        phrases, prefixes = self.phrases, self._prefixes
        first = 0
        while first < len(words):
            match, start = None, words[first][0]
            for last in range(first, len(words)):
                # The text under the span, not its words joined by spaces, so "hot-dog" and "t.v."
                # match as written whatever the tokenizer's pre-tokenisation did to them.
                phrase = _normalize(text[start : words[last][1]])
                if phrase not in prefixes:
                    break
                if phrase in phrases:
                    match = (last, phrases[phrase])
            if match is None:
                first += 1
                continue
            last, concept_id = match
            for word in words[first : last + 1]:
                for index in word[2]:
                    concept_ids[index] = concept_id
            first = last + 1
        return concept_ids

    def to_dict(self) -> dict:
        """The constructor arguments (user synonyms only): enough to rebuild the same phrase table."""
        return {
            "concept_names": list(self.concept_names),
            "synonyms": {name: list(phrases) for name, phrases in self.synonyms.items()},
            "plurals": self.plurals,
            "default_synonyms": self.default_synonyms,
        }

    @classmethod
    def from_dict(cls, config: dict) -> "AnchorLexicon":
        """Rebuild a lexicon from `to_dict()` output."""
        unknown = sorted(set(config) - {"concept_names", "synonyms", "plurals", "default_synonyms"})
        if unknown:
            raise ValueError(f"`config` has unknown keys: {unknown}")
        return cls(**config)

    def to_json_file(self, path: str | os.PathLike) -> None:
        """Write `to_dict()` as UTF-8 JSON (indent 2, sorted keys) for stable, diff-friendly files."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n")

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "AnchorLexicon":
        """Read a lexicon written by `to_json_file`."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def __eq__(self, other) -> bool:
        if not isinstance(other, AnchorLexicon):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return (
            f"AnchorLexicon({len(self.concept_names)} concepts, {len(self.phrases)} phrases, "
            f"plurals={self.plurals}, default_synonyms={self.default_synonyms})"
        )


__all__ = ["DEFAULT_SYNONYMS", "AnchorLexicon", "pluralize"]
