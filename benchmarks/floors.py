"""Floors and ceilings of the synthetic world's tasks: what chance, the text alone, cheap rules and the regions read
by a trained reader score.

    python benchmarks/floors.py --split validation   # the default world (2000 images), the split the study scores
    python benchmarks/floors.py --num_images 8000    # a bigger one
    python benchmarks/floors.py --split validation --learnability 2000   # and what a small model learns (~20 min)

A model's score means something only above the best score that needs no learning of the image, and next to
the best the regions allow. Per task, on `--split` (every reader learns from the train split):

* chance: a uniform guess (VQA: among the answers of the question's type; REC: among the image's regions);
* text-only readers (VQA, VE, NLVR2): the majority label (per question type), the exact-text lookup, the label
  the text had *least* often in training (it wins where labels are balanced over all splits together), the
  answer prior by question type and concept words, and logistic regressions on word 1-2-grams and on
  character 2-5-grams (scikit-learn). `tests/test_floors.py` fails when one passes chance + 0.03;
* rules (REC): a uniform pick among the regions tagged with the named shape, the size word ("small" -> the
  smallest such box), the relation word ("left of" -> the leftmost), and both;
* rules (ITM, on the held-out pairs pre-training validates on, `MatchingPairs`): AUC of region count against
  the caption's count, tag overlap, tags + count + colour, and a logistic regression on seven such features
  (learnt on training pairs). The world's negatives are contrast twins (same count and tags), so these stay
  low while a model that grounds the words can pass them;
* rules (retrieval): text->image R@1 of the best rule ranker (the ITM regression's score; ties count 1/k);
* the ceiling, "region oracle": `RegionReader` parses each text with the world's templates and answers it from
  the regions, reading each region's shape and colour with logistic regressions trained on the training
  images' regions (`TrainedReader`; its held-out accuracy is printed), the size and place from the box.
  "tag oracle" is the same reader trusting the detector's noisy tags instead (the old ceiling);
* with `--learnability STEPS`: how much of each gap a model of the study's size, trained from scratch on the
  oracle's inputs for STEPS steps, closes (`benchmarks/learnability.py`).

`floor(row)` is the best score that needs no learning of the image; `gap_closed(accuracy, row)` =
(accuracy - floor) / (oracle - floor).
"""

import argparse
import re
from collections import Counter
from types import SimpleNamespace

import numpy as np

from cmal.training.data import synthetic
from cmal.training.tasks import TASKS
from cmal.training.data.files import write_json


CONFIDENT = 0.5  # a region scoring at least this is taken for an object (the world's distractors score < 0.5)
TEXT_READERS = ("majority", "text lookup", "least seen", "concept prior", "word n-grams", "char n-grams")
REC_RULES = ("tags", "size word", "relation word", "size + relation words")
ITM_RULES = ("count", "tags", "tags + count + colour", "rule regression")


def _groups(table) -> list:
    """The question type of each example where the world records one (VQA), else one group."""
    return table["question_type"] if "question_type" in table.column_names else [None] * len(table)


def chance(world: dict, task, split: str = "test") -> float:
    """Accuracy of a uniform guess among the labels an example's text can have, or among the regions of its
    image for a task that points at a region."""
    test = task.synthetic_data(world)[split]
    if task.text_labels(test) is None:
        regions = {row["image_id"]: len(row["scores"]) for row in store_rows(world, ["image_id", "scores"])}
        return float(np.mean([1 / regions[image_id] for image_id in test["image_id"]]))
    options = world["world"]["question_options"]
    labels = len(task.class_names) or len(set(task.text_labels(task.synthetic_data(world)["train"])))
    return float(np.mean([1 / (len(options[group]) if group else labels) for group in _groups(test)]))


def _concept_words(text: str) -> tuple:
    """The words of a text that name a shape (as its concept), a colour, a size or a number: what a prior by
    concept words conditions on."""
    lexicon, kept = synthetic._lexicon(), []
    for word in re.findall(r"[a-z0-9]+", text):
        concept = lexicon.concept_of(word)
        if concept >= 0:
            kept.append(synthetic.SHAPES[concept])
        elif word in synthetic.COLOURS or word in synthetic.SIZES or word in synthetic.NUMBER_WORDS:
            kept.append(word)
    return tuple(kept)


def text_floors(world: dict, task, split: str = "test") -> dict[str, float]:
    """Accuracy on `split` of each text-only reader of `TEXT_READERS`, learnt on the train split."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    train, test = task.synthetic_data(world)["train"], task.synthetic_data(world)[split]
    train_texts, train_labels = train[task.text_column], task.text_labels(train)
    test_texts, test_labels = test[task.text_column], np.asarray(task.text_labels(test))
    options = {}  # the labels each group's texts can have, in the order the training split first gives them
    by_group, seen, by_concepts = {}, {}, {}
    for text, group, label in zip(train_texts, _groups(train), train_labels):
        options.setdefault(group, Counter())[label] += 0
        by_group.setdefault(group, Counter())[label] += 1
        seen.setdefault(text, Counter())[label] += 1
        by_concepts.setdefault((group, _concept_words(text)), Counter())[label] += 1
    test_groups = _groups(test)
    majority = [by_group[group].most_common(1)[0][0] for group in test_groups]

    def least_seen(text, group, fallback):
        if text not in seen:
            return fallback
        counts = seen[text]
        return min(options[group], key=lambda label: (counts[label], -by_group[group][label]))

    predictions = {
        "majority": majority,
        "text lookup": [seen[t].most_common(1)[0][0] if t in seen else m for t, m in zip(test_texts, majority)],
        "least seen": [least_seen(t, g, m) for t, g, m in zip(test_texts, test_groups, majority)],
        "concept prior": [by_concepts[(g, _concept_words(t))].most_common(1)[0][0] if (g, _concept_words(t)) in by_concepts
                          else m for t, g, m in zip(test_texts, test_groups, majority)],  # fmt: skip
    }
    for name, vectorizer in (("word n-grams", CountVectorizer(ngram_range=(1, 2), token_pattern=r"[a-z0-9]+")),
                             ("char n-grams", CountVectorizer(analyzer="char_wb", ngram_range=(2, 5)))):  # fmt: skip
        classifier = LogisticRegression(max_iter=2000).fit(vectorizer.fit_transform(train_texts), train_labels)
        predictions[name] = classifier.predict(vectorizer.transform(test_texts))
    return {name: float((np.asarray(predicted) == test_labels).mean()) for name, predicted in predictions.items()}


# ------------------------------------------------------------------------------------------------
# Reading the regions: the detector's tags, or a reader trained on the regions' features
# ------------------------------------------------------------------------------------------------

PALETTE = np.array(list(synthetic.COLOURS.values()), np.float64)
LARGE_SIDE = 25  # pixels: small objects are 14-22 wide, large ones 28-40, before the detector's jitter


def store_rows(world: dict, columns: list[str]) -> list[dict]:
    """The region store's rows as numpy arrays, read a column at a time: row by row, datasets' formatter took
    most of a floor table's time."""
    table = world["regions"].select_columns(columns).with_format("numpy")[:]
    return [dict(zip(columns, values)) for values in zip(*(table[column] for column in columns))]


def labelled_regions(world: dict, scenes: list):
    """(store row, region index, features, object) of every confident region that overlaps an object of its
    scene (`synthetic.world_scenes`) with IoU >= 0.5: the regions whose true shape, colour and size are known."""
    import torch

    from cmal.training.data.downstream import box_iou

    columns = ["image_width", "image_height", "features", "boxes", "scores"]
    for row, image in enumerate(store_rows(world, columns)):
        objects = scenes[row].objects
        confident = np.flatnonzero(np.asarray(image["scores"]) >= CONFIDENT)
        if not objects or not len(confident):
            continue
        scale = [image["image_width"], image["image_height"]] * 2
        regions = torch.tensor(np.asarray(image["boxes"])[confident] * scale, dtype=torch.float64)
        boxes = torch.tensor([obj.box for obj in objects], dtype=torch.float64)
        overlaps = box_iou(boxes.expand(len(regions), -1, -1), regions)  # [region, object]
        best, which = overlaps.max(1)
        for k, iou, obj in zip(confident.tolist(), best.tolist(), which.tolist()):
            if iou >= 0.5:
                yield row, k, np.asarray(image["features"][k], np.float64), objects[obj]


class TrainedReader:
    """Shape and colour of a region read from its features by two logistic regressions, learnt on the
    confident regions of the training images, each labelled with the object of its scene it overlaps most
    (IoU >= 0.5). The detector's tags are wrong on a tenth of the regions; the pixels are not."""

    def __init__(self, world: dict):
        from sklearn.linear_model import LogisticRegression

        self.scenes = synthetic.world_scenes(world)
        split_of = {image_id: split for split in synthetic.SPLIT_NAMES
                    for image_id in world["captions"][split]["image_id"]}  # fmt: skip
        data = {split: ([], [], []) for split in synthetic.SPLIT_NAMES}
        image_ids = world["regions"]["image_id"][:]
        for row, _, features, obj in labelled_regions(world, self.scenes):
            x, shapes, colours = data[split_of.get(image_ids[row], "train")]
            x.append(features), shapes.append(obj.shape), colours.append(obj.colour)
        x, shapes, colours = (np.asarray(v) for v in data["train"])
        self.shape = LogisticRegression(max_iter=3000, C=10).fit(x, shapes)
        self.colour = LogisticRegression(max_iter=3000, C=10).fit(x, colours)
        self.accuracy = {}
        for split in ("validation", "test"):
            x, shapes, colours = (np.asarray(v) for v in data[split])
            if len(x):
                self.accuracy[split] = {"shape": float((self.shape.predict(x) == shapes).mean()),
                                        "colour": float((self.colour.predict(x) == colours).mean())}  # fmt: skip

    def __call__(self, features: np.ndarray) -> tuple[list, list]:
        """(shapes, colours) of regions with these features."""
        return self.shape.predict(features).tolist(), self.colour.predict(features).tolist()


class RegionReader:
    """Reads an image as its regions show it: confident regions are objects, the size and place come from the
    box, the shape and colour from `reader` (a `TrainedReader`) or, without one, from the detector's tag and
    the palette colour nearest the foreground's mean RGB. Phrases are matched and relations tested as the
    world's generator does (`synthetic.described`, `synthetic.relation_holds`)."""

    def __init__(self, world: dict, reader: TrainedReader | None = None):
        self.images = {}
        columns = ["image_id", "image_width", "features", "boxes", "concept_ids", "scores"]
        rows = store_rows(world, columns)
        if reader is not None:  # one call for every region: per image, the regressions' overhead dominates
            read = reader(np.concatenate([np.asarray(row["features"], np.float64) for row in rows]))
            ends = np.cumsum([len(row["scores"]) for row in rows])
            read = [(read[0][end - len(row["scores"]) : end], read[1][end - len(row["scores"]) : end]) for row, end in zip(rows, ends)]
        for i, row in enumerate(rows):
            side = row["image_width"]
            features, boxes = np.asarray(row["features"], np.float64), np.asarray(row["boxes"]) * side
            if reader is not None:
                shapes, colours = read[i]
            else:
                shapes = [synthetic.SHAPES[tag] if tag >= 0 else None for tag in row["concept_ids"]]
                colours = [list(synthetic.COLOURS)[int(np.argmin(((PALETTE - rgb) ** 2).sum(1)))] for rgb in features[:, 64:67] * 255]
            self.images[row["image_id"]] = [
                SimpleNamespace(
                    shape=shapes[k], colour=colours[k], row=k,
                    size="large" if max(boxes[k, 2] - boxes[k, 0], boxes[k, 3] - boxes[k, 1]) > LARGE_SIDE else "small",
                    centre=((boxes[k, 0] + boxes[k, 2]) / 2, (boxes[k, 1] + boxes[k, 3]) / 2), box=boxes[k],
                )
                for k in range(len(boxes)) if row["scores"][k] >= CONFIDENT
            ]  # fmt: skip

    def referent(self, objects: list, expression: str) -> list:
        """The objects "the X" or "the X <relation> the Y" can mean."""
        if m := re.fullmatch(rf"the (.+?) ({synthetic.RELATION_PATTERN}) the (.+)", expression):
            anchors = synthetic.described(objects, m[3])
            relation = synthetic.RELATION_OF[m[2]]
            return [o for o in synthetic.described(objects, m[1])
                    if any(o is not a and synthetic.relation_holds(o, a, relation) for a in anchors)]  # fmt: skip
        return synthetic.described(objects, expression)

    def vqa(self, item) -> str:
        objects, question = self.images[item["image_id"]], item["question"]
        if m := re.fullmatch(r"what (colour|shape) is the (.+)\?", question):
            found = self.referent(objects, "the " + m[2])
            return getattr(found[0], m[1]) if found and getattr(found[0], m[1]) else "no"
        if m := re.fullmatch(r"how many (.+) are there\?", question):
            return str(len(synthetic.described(objects, m[1])))
        if m := re.fullmatch(r"is there an? (.+)\?", question):
            return "yes" if synthetic.described(objects, m[1]) else "no"
        m = re.fullmatch(rf"what is ({synthetic.RELATION_PATTERN}) the (.+)\?", question)
        anchors = self.referent(objects, "the " + m[2])
        relation = synthetic.RELATION_OF[m[1]]
        found = [o for o in objects if anchors and o is not anchors[0] and synthetic.relation_holds(o, anchors[0], relation)]
        return found[0].shape if found and found[0].shape else "no"

    def ve(self, item) -> int:
        m = re.fullmatch(r"the (.+) is (\w+)\.", item["hypothesis"])
        stated = "size" if m[2] in synthetic.SIZES else "colour"
        fitting = {getattr(o, stated) == m[2] for o in synthetic.described(self.images[item["image_id"]], m[1])}
        return 1 if fitting == {True, False} else 0 if fitting == {True} else 2

    def nlvr2(self, item) -> int:
        sides = {"left": self.images[item["left_image_id"]], "right": self.images[item["right_image_id"]]}
        sentence = item["sentence"]
        if m := re.fullmatch(r"the (left|right) image contains an? (.+)\.", sentence):
            return int(bool(synthetic.described(sides[m[1]], m[2])))
        if m := re.fullmatch(r"the (left|right) image contains exactly (\w+) objects?\.", sentence):
            return int(synthetic.NUMBER_WORDS.index(m[2]) == len(sides[m[1]]))
        if sentence == "the left image has more objects than the right image.":
            return int(len(sides["left"]) > len(sides["right"]))
        if m := re.fullmatch(r"there (?:is|are) (?:exactly )?(\w+) (.+) in total\.", sentence):
            total = sum(len(synthetic.described(objects, m[2])) for objects in sides.values())
            return int(synthetic.NUMBER_WORDS.index(m[1]) == total)
        m = re.fullmatch(r"(both images|exactly one image|neither image) contains? an? (.+)\.", sentence)
        has = [bool(synthetic.described(objects, m[2])) for objects in sides.values()]
        return int({"both images": all(has), "exactly one image": sum(has) == 1, "neither image": not any(has)}[m[1]])

    def rec(self, item) -> int:
        found = self.referent(self.images[item["image_id"]], item["expression"])
        return found[0].row if found else -1


def region_oracle(world: dict, split: str = "test", reader: RegionReader | None = None) -> dict[str, float]:
    """Accuracy of `RegionReader` per task on `split`: what the regions allow (the ceiling)."""
    reader = reader or RegionReader(world, TrainedReader(world))
    scores = {}
    for name, read, truth in (("vqa", reader.vqa, lambda item: item["answers"][0]), ("ve", reader.ve, lambda item: item["label"]),
                              ("nlvr2", reader.nlvr2, lambda item: item["label"]), ("rec", reader.rec, lambda item: item["target_index"])):  # fmt: skip
        test = TASKS[name].synthetic_data(world)[split]
        scores[name] = float(np.mean([read(item) == truth(item) for item in test]))
    return scores


# ------------------------------------------------------------------------------------------------
# Rules: what needs no grounding of the words
# ------------------------------------------------------------------------------------------------


def _area(obj) -> float:
    return (obj.box[2] - obj.box[0]) * (obj.box[3] - obj.box[1])


def rec_rules(world: dict, split: str = "test", tags: RegionReader | None = None) -> dict[str, float]:
    """REC by the detector's tags and the expression's size and relation words, no colour or binding read:
    among the regions tagged with the shape the expression names first (all regions when none is), "small"
    / "large" picks the smallest / largest box, "left of" / "right of" / "above" / "below" the leftmost /
    rightmost / highest / lowest one; otherwise (and on ties) a uniform pick. Expected accuracy of each."""
    tags = tags or RegionReader(world)
    lexicon, scores = synthetic.synthetic_lexicon(), {rule: [] for rule in REC_RULES}
    for item in world["rec"][split]:
        expression, objects = item["expression"], tags.images[item["image_id"]]
        concept = next(c for c in map(lexicon.concept_of, expression.split()) if c >= 0)
        candidates = [o for o in objects if o.shape == synthetic.SHAPES[concept]] or objects
        head = re.split(synthetic.RELATION_PATTERN, expression)[0]
        relation = re.search(synthetic.RELATION_PATTERN, expression)
        size = {"small": _area, "large": lambda o: -_area(o)}.get(next((w for w in head.split() if w in synthetic.SIZES), None))
        place = relation and {"left": lambda o: o.centre[0], "right": lambda o: -o.centre[0], "above": lambda o: o.centre[1],
                              "below": lambda o: -o.centre[1]}[synthetic.RELATION_OF[relation[0]]]  # fmt: skip
        for rule, key in zip(REC_RULES, (None, size, place, size or place)):
            chosen = candidates
            if key is not None and candidates:
                best = min(map(key, candidates))
                chosen = [o for o in candidates if key(o) == best]
            hit = sum(o.row == item["target_index"] for o in chosen)
            scores[rule].append(hit / len(chosen) if chosen else 0.0)
    return {rule: float(np.mean(values)) for rule, values in scores.items()}


def caption_facts(caption: str) -> dict:
    """What a rule reads off a caption: the object count it states (None where it states none), and its
    shapes with the count given for each (None where a listing gives none), colours and size words."""
    text = caption.removesuffix(".").removesuffix(" on a grey background")
    count = None
    if m := re.fullmatch(r"a scene with (?:a single object|(\w+) objects, among them):? (.+)", text):
        count, text = synthetic._NUMBER.get(m[1] or "one"), m[2]
    words, lexicon = re.findall(r"[a-z]+", text), synthetic._lexicon()
    shapes, number = {}, None
    for word in words:
        if word in synthetic._NUMBER:
            number = synthetic._NUMBER[word]
        elif (concept := lexicon.concept_of(word)) >= 0:
            shape = synthetic.SHAPES[concept]
            shapes[shape] = None if number is None or shape in shapes else number
            number = None
    if count is None and not re.search(synthetic.RELATION_PATTERN, text) and all(n is not None for n in shapes.values()):
        count = sum(shapes.values())  # a listing names every object
    return {"count": count, "shapes": shapes, "colours": {w for w in words if w in synthetic.COLOURS},
            "sizes": {w for w in words if w in synthetic.SIZES}}  # fmt: skip


def rule_features(caption: str, objects: list) -> np.ndarray:
    """Seven cheap features of a (caption, image) pair: count stated and agreeing (1), disagreeing (0) or
    not stated (0.5); the count's absolute difference; the share of the caption's shapes among the tags,
    of its colours among the regions' colours, of its size words among their sizes; the share of its
    shapes whose stated count equals the tags' count; the number of objects."""
    facts = caption_facts(caption)
    tags = Counter(o.shape for o in objects)
    colours, sizes = {o.colour for o in objects}, {o.size for o in objects}
    stated = facts["count"]
    counted = [n == tags[shape] for shape, n in facts["shapes"].items() if n is not None]
    return np.array([
        0.5 if stated is None else float(stated == len(objects)),
        0.0 if stated is None else abs(stated - len(objects)),
        np.mean([shape in tags for shape in facts["shapes"]]) if facts["shapes"] else 1.0,
        np.mean([c in colours for c in facts["colours"]]) if facts["colours"] else 1.0,
        np.mean([s in sizes for s in facts["sizes"]]) if facts["sizes"] else 1.0,
        np.mean(counted) if counted else 1.0,
        len(objects),
    ])  # fmt: skip


def _rule_scores(features: np.ndarray, regression) -> dict[str, np.ndarray]:
    return {"count": features[:, 0] - 0.01 * features[:, 1], "tags": features[:, 2],
            "tags + count + colour": features[:, 0] + features[:, 2] + features[:, 3],
            "rule regression": regression.predict_proba(features)[:, 1]}  # fmt: skip


def matching_pairs(world: dict, split: str, twin_probability: float | None = None):
    """(captions, image rows, labels): the ITM pairs of `split` as pre-training draws them with its default
    arguments (`training/pretrain.py`); held-out ones as `pretrain_run.validation_loader` does (seed + 1,
    half negatives, all of them contrast twins where the caption is false of its twin)."""
    from cmal.training.data.pretraining import ImageTextPairs, MatchingPairs
    from cmal.training.pretrain import parse_args

    defaults = parse_args([])
    seed = defaults.seed + (split != "train")
    pairs = ImageTextPairs(world["captions"][split], world["regions"])
    probability = defaults.itm_negative_probability if split == "train" else 0.5
    if twin_probability is None:
        twin_probability = defaults.itm_twin_probability if split == "train" else 1.0
    matching = MatchingPairs(pairs.num_regions(), probability, synthetic.caption_truth(world), defaults.itm_negative_window,
                             synthetic.twin_rows(world["regions"]["image_id"][:]), twin_probability)  # fmt: skip
    rows, labels = matching.pairs(pairs, seed)
    return world["captions"][split]["text"], rows, labels


def _pair_features(world: dict, split: str, tags: RegionReader, twin_probability: float | None = None):
    """(`rule_features` of every ITM pair of `split`, their labels)."""
    texts, rows, labels = matching_pairs(world, split, twin_probability)
    image_ids = world["regions"]["image_id"][:]
    return np.stack([rule_features(t, tags.images[image_ids[r]]) for t, r in zip(texts, rows)]), labels


def rule_regression(world: dict, tags: RegionReader, twin_probability: float | None = None):
    """The logistic regression on `rule_features`, learnt on the training ITM pairs: the strongest rule, for ITM
    and as retrieval's ranker."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=2000).fit(*_pair_features(world, "train", tags, twin_probability))


def itm_rules(world: dict, split: str = "validation", tags: RegionReader | None = None,
              twin_probability: float | None = None, regression=None) -> dict[str, float]:  # fmt: skip
    """AUC of each rule of `ITM_RULES` on the held-out ITM pairs of `split` (`regression`: `rule_regression`,
    learnt here when not given); `twin_probability` overrides how often the negatives are contrast twins."""
    from cmal.training.metrics import binary_auc

    tags = tags or RegionReader(world)
    regression = regression or rule_regression(world, tags, twin_probability)
    x, labels = _pair_features(world, split, tags, twin_probability)
    return {name: binary_auc(score, labels) for name, score in _rule_scores(x, regression).items()}


def retrieval_items(world: dict, split: str, num_images: int = 50) -> tuple[list, list]:
    """(the first `num_images` image ids of the split, the captions of those images): what retrieval scores."""
    table = TASKS["retrieval"].synthetic_data(world)[split]
    images = list(dict.fromkeys(table["image_id"]))[:num_images]
    kept = set(images)
    return images, [item for item in table if item["image_id"] in kept]


def _recall_at_1(scores: np.ndarray, truth: list[int]) -> float:
    """Expected text->image R@1 of a score matrix [captions, images] whose ties are broken at random."""
    best = scores == scores.max(1, keepdims=True)
    return float(np.mean([best[i, t] / best[i].sum() for i, t in enumerate(truth)]))


def retrieval(world: dict, split: str = "test", num_images: int = 50, reader: RegionReader | None = None,
              tags: RegionReader | None = None, regression=None) -> dict:  # fmt: skip
    """Text->image R@1 over the first `num_images` images of the split (as `finetune.py --task retrieval` scores
    it): chance; the rule ranker (the ITM rule regression's score over the detector's tags, count and colours);
    and the region oracle, which ranks first the images whose regions `reader` finds the caption true of
    (`synthetic.caption_holds`). A caption true of k images caps R@1 at 1/k."""
    reader = reader or RegionReader(world, TrainedReader(world))
    tags = tags or RegionReader(world)
    regression = regression or rule_regression(world, tags)
    images, captions = retrieval_items(world, split, num_images)
    truth = [images.index(item["image_id"]) for item in captions]
    features = np.stack([rule_features(item["text"], tags.images[image]) for item in captions for image in images])
    rules = regression.predict_proba(features)[:, 1].reshape(len(captions), len(images))
    oracle = np.array([[float(synthetic.caption_holds(item["text"], SimpleNamespace(objects=reader.images[image])))
                        for image in images] for item in captions])  # fmt: skip
    return {"chance": 1 / len(images), "rule ranker": _recall_at_1(rules, truth), "region oracle": _recall_at_1(oracle, truth)}


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------


def floors(world: dict, split: str = "test", trained: TrainedReader | None = None) -> dict[str, dict[str, float]]:
    """{task: {"chance": ..., <reader or rule>: ..., "tag oracle": ..., "region oracle": ...}} on `split`, and
    {"itm": {<rule>: AUC}} on the held-out pre-training pairs; "reader" holds the trained reader's accuracy."""
    trained = trained or TrainedReader(world)
    reader, tags = RegionReader(world, trained), RegionReader(world)
    table, oracle, tag_oracle = {}, region_oracle(world, split, reader), region_oracle(world, split, tags)
    for task in TASKS.values():
        test = task.synthetic_data(world)[split]
        if task.text_labels(test) is not None:
            table[task.name] = {"chance": chance(world, task, split), **text_floors(world, task, split)}
        elif task.target_column is not None:
            table[task.name] = {"chance": chance(world, task, split), **rec_rules(world, split, tags)}
        if task.name in table:
            table[task.name] |= {"tag oracle": tag_oracle[task.name], "region oracle": oracle[task.name]}
    regression = rule_regression(world, tags)
    table["retrieval"] = retrieval(world, split, reader=reader, tags=tags, regression=regression)
    table["itm"] = {"chance": 0.5, **itm_rules(world, "validation", tags, regression=regression)}
    table["reader"] = trained.accuracy[split]
    return table


CEILINGS = ("tag oracle", "region oracle")


def floor(row: dict) -> float:
    """The floor a model's score is read against: the best score that needs no learning of the image."""
    return max(value for name, value in row.items() if name not in CEILINGS)


PASS_TOLERANCE = 0.02  # a model may beat the ceiling by this much on a finite split (the items the oracle misses)


def gap_closed(accuracy: float, row: dict) -> float:
    """(accuracy - floor) / (region oracle - floor): 0 at the floor, 1 at the trained reader's ceiling. A score
    above the ceiling means the ruler is broken (the model sees what the oracle does not): an error, not a win."""
    if accuracy > row["region oracle"] + PASS_TOLERANCE:
        raise ValueError(f"a score of {accuracy:.3f} passes the region oracle's ceiling {row['region oracle']:.3f}: the "
                         "oracle misses something the model reads, so the gap closed would mean nothing; fix the oracle")  # fmt: skip
    return (accuracy - floor(row)) / (row["region oracle"] - floor(row))


def markdown(table: dict, world: dict, split: str = "test") -> str:
    """One table per kind of floor: text readers, rules, and the ITM rules' AUC."""
    images, captions = retrieval_items(world, split)  # retrieval scores the first images only, as finetune.py does
    items = {name: len(TASKS[name].synthetic_data(world)[split]) for name in table if name in TASKS}
    items["retrieval"] = f"{len(captions)} captions of {len(images)} images"
    sections = []
    for tasks, columns in ((("vqa", "ve", "nlvr2"), ("chance", *TEXT_READERS)),
                           (("rec", "retrieval"), ("chance", *REC_RULES, "rule ranker"))):  # fmt: skip
        columns = (*columns, "floor", *CEILINGS)
        lines = [f"| task | {split} items | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
        for task in tasks:
            row = {**table[task], "floor": floor(table[task])}
            lines.append(f"| {task} | {items[task]} | " + " | ".join(f"{row[c]:.3f}" if c in row else "" for c in columns) + " |")
        sections.append("\n".join(lines))
    itm = table["itm"]
    sections.append("| held-out ITM pairs (validation) | " + " | ".join(itm) + " |\n" + "|---" * (len(itm) + 1) + "|\n"
                    + "| AUC | " + " | ".join(f"{v:.3f}" for v in itm.values()) + " |")  # fmt: skip
    reader = table["reader"]
    sections.append(f"trained reader on the {split} images' regions: shape {reader['shape']:.3f}, colour {reader['colour']:.3f} "
                    "(the detector's tags: shape right on about 0.9)")  # fmt: skip
    return "\n\n".join(sections)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="test", choices=["validation", "test"], help="Where the floors are scored.")
    parser.add_argument("--learnability", type=int, default=0, metavar="STEPS",
                        help="Also train benchmarks/learnability.py's small model on every task for STEPS steps (the "
                             "study's budget: 2000, about 20 min on one thread) and print how much of each gap it closes.")
    parser.add_argument("--output", default=None, help="Also write the table as JSON here.")
    args = parser.parse_args(argv)
    world = synthetic.load_world(synthetic.default_world(num_images=args.num_images, seed=args.seed))
    trained = TrainedReader(world)
    table = floors(world, args.split, trained)
    print(markdown(table, world, args.split), flush=True)
    if args.learnability:
        import learnability  # beside this script; it reads this module, so only on demand

        settings = learnability.parse_args(["--seed", str(args.seed), "--split", args.split, "--steps", str(args.learnability)])
        results = learnability.measure(world, table, trained, settings)
        print("\n" + learnability.markdown(results, args.split))
        table["learnability"] = {"steps": args.learnability, **results}
    if args.output:
        write_json(args.output, table)
    return table


if __name__ == "__main__":
    main()
