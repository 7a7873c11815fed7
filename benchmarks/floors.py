"""Floors of the synthetic world's tasks: what chance, the text alone and the detector's tags alone score.

    python benchmarks/floors.py                      # the default world (2000 images)
    python benchmarks/floors.py --num_images 20000   # a bigger one

A fine-tuned model's accuracy means something only above the best score that needs no image. Per task,
on the test split (trained on the train split):

* chance: a uniform guess (VQA: among the answers of the question's type; REC: among the image's regions);
* majority: the most frequent training label (VQA: per question type);
* text lookup: the most frequent training label of the exact text, else the majority;
* text classifier: a logistic regression on the text's word 1- and 2-grams (scikit-learn), the
  strongest text-only reader here;
* tags (REC): a uniform guess among the regions whose detected tag is the shape the expression names;
* region oracle, the ceiling: `RegionReader`, a symbolic reader of the stored regions (tag = shape, nearest
  palette colour, box size and place) that parses each text with the world's templates. It learns nothing
  and trusts the detector, so tag noise caps it (a model that reads shapes from the pixels can pass it).

`gap_closed(accuracy, row)` = (accuracy - floor) / (oracle - floor), the floor being the best no-image score.

`TextBalancer` gives every text each of its labels equally often, so the text-only floors sit at chance;
`tests/test_floors.py` fails when one exceeds chance + 0.03.
"""

import argparse
import json
import re
from collections import Counter
from functools import partial
from types import SimpleNamespace

import numpy as np

from cmal.training.data import synthetic
from cmal.training.tasks import TASKS


def _groups(table) -> list:
    """The question type of each example where the world records one (VQA), else one group."""
    return table["question_type"] if "question_type" in table.column_names else [None] * len(table)


def chance(world: dict, task, split: str = "test") -> float:
    """Test accuracy of a uniform guess among the labels an example's text can have, or among the regions
    of its image for a task that points at a region."""
    test = world[task.synthetic_table][split]
    if task.text_labels(test) is None:
        regions = {row["image_id"]: len(row["scores"]) for row in world["regions"].select_columns(["image_id", "scores"])}
        return float(np.mean([1 / regions[image_id] for image_id in test["image_id"]]))
    options = world["world"]["question_options"]
    labels = len(task.class_names) or len(set(task.text_labels(world[task.synthetic_table]["train"])))
    return float(np.mean([1 / (len(options[group]) if group else labels) for group in _groups(test)]))


def text_floors(world: dict, task, split: str = "test") -> dict[str, float]:
    """Test accuracy of the majority label (per question type), the exact-text lookup and the n-gram classifier."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    train, test = world[task.synthetic_table]["train"], world[task.synthetic_table][split]
    train_texts, train_labels = train[task.text_column], task.text_labels(train)
    test_texts, test_labels = test[task.text_column], np.asarray(task.text_labels(test))
    by_group = {}
    for group, label in zip(_groups(train), train_labels):
        by_group.setdefault(group, Counter())[label] += 1
    majority = np.array([by_group[group].most_common(1)[0][0] for group in _groups(test)])
    seen = {}
    for text, label in zip(train_texts, train_labels):
        seen.setdefault(text, Counter())[label] += 1
    lookup = np.array([seen[t].most_common(1)[0][0] if t in seen else m for t, m in zip(test_texts, majority)])
    vectorizer = CountVectorizer(ngram_range=(1, 2), token_pattern=r"[a-z0-9]+")
    classifier = LogisticRegression(max_iter=2000).fit(vectorizer.fit_transform(train_texts), train_labels)
    predicted = classifier.predict(vectorizer.transform(test_texts))
    return {
        "majority": float((majority == test_labels).mean()),
        "text lookup": float((lookup == test_labels).mean()),
        "text classifier": float((predicted == test_labels).mean()),
    }


def tag_floor(world: dict, task, split: str = "test") -> float:
    """REC by the detected tags alone: expected accuracy of a uniform pick among the regions tagged with the
    shape the expression names first (among all regions when none is)."""
    lexicon = synthetic.synthetic_lexicon()
    tags = {row["image_id"]: row["concept_ids"] for row in world["regions"].select_columns(["image_id", "concept_ids"])}
    scores = []
    for item in world[task.synthetic_table][split]:
        words = item[task.text_column].split()  # "the <attributes> <noun> [<relation> the <anchor>]": the first noun
        concept = next(c for c in map(lexicon.concept_of, words) if c >= 0)
        image_tags = np.asarray(tags[item["image_id"]])
        candidates = np.flatnonzero(image_tags == concept)
        if len(candidates) == 0:
            candidates = np.arange(len(image_tags))
        scores.append(float(item["target_index"] in candidates) / len(candidates))
    return float(np.mean(scores))


# ------------------------------------------------------------------------------------------------
# The ceiling: a symbolic reader of the stored regions
# ------------------------------------------------------------------------------------------------

REL, RELATION_OF = synthetic.RELATION_PATTERN, synthetic.RELATION_OF
PALETTE = np.array(list(synthetic.COLOURS.values()), np.float64)
LARGE_SIDE = 25  # pixels: small objects are 14-22 wide, large ones 28-40, before the detector's jitter


class RegionReader:
    """Reads an image as its regions show it, with nothing learnt: confident regions (score >= 0.5) are
    objects, the tag is the shape, the palette colour nearest the foreground's mean RGB is the colour, the
    box gives the size and the place. Tag noise, jitter and distractors make it miss what they hide.
    Phrases are matched and relations tested as the world's generator does (`synthetic.described`,
    `synthetic.relation_holds`)."""

    def __init__(self, world: dict):
        self.images = {}
        columns = ["image_id", "image_width", "features", "boxes", "concept_ids", "scores"]
        for row in world["regions"].select_columns(columns).with_format("numpy"):
            side = row["image_width"]
            features, boxes = np.asarray(row["features"], np.float64), np.asarray(row["boxes"]) * side
            rgb = features[:, 64:67] * 255
            objects = [
                SimpleNamespace(
                    shape=synthetic.SHAPES[tag] if tag >= 0 else None,
                    colour=list(synthetic.COLOURS)[int(np.argmin(((PALETTE - rgb[k]) ** 2).sum(1)))],
                    size="large" if max(boxes[k, 2] - boxes[k, 0], boxes[k, 3] - boxes[k, 1]) > LARGE_SIDE else "small",
                    centre=((boxes[k, 0] + boxes[k, 2]) / 2, (boxes[k, 1] + boxes[k, 3]) / 2), row=k,
                )
                for k, tag in enumerate(row["concept_ids"]) if row["scores"][k] >= 0.5
            ]  # fmt: skip
            self.images[row["image_id"]] = objects

    def referent(self, objects: list, expression: str) -> list:
        """The objects "the X" or "the X <relation> the Y" can mean."""
        if m := re.fullmatch(rf"the (.+?) ({REL}) the (.+)", expression):
            anchors = synthetic.described(objects, m[3])
            relation = RELATION_OF[m[2]]
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
        m = re.fullmatch(rf"what is ({REL}) the (.+)\?", question)
        anchors = self.referent(objects, "the " + m[2])
        found = [o for o in objects if anchors and o is not anchors[0] and synthetic.relation_holds(o, anchors[0], RELATION_OF[m[1]])]
        return found[0].shape if found and found[0].shape else "no"

    def ve(self, item) -> int:
        objects, hypothesis = self.images[item["image_id"]], item["hypothesis"]
        if m := re.fullmatch(rf"the (.+?) is ({REL}) the (.+)\.", hypothesis):
            first, second = self.referent(objects, "the " + m[1]), self.referent(objects, "the " + m[3])
            if not first or not second:
                return 2
            relation = RELATION_OF[m[2]]
            holds = partial(synthetic.relation_holds, first[0], second[0])
            return 0 if holds(relation) else 2 if holds(synthetic.OPPOSITE[relation]) else 1
        m = re.fullmatch(r"the (.+) is (\w+)\.", hypothesis)
        fitting = {o.colour == m[2] for o in self.referent(objects, "the " + m[1])}
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
    """Test accuracy of `RegionReader` per task: what the regions allow without learning (the ceiling)."""
    reader = reader or RegionReader(world)
    scores = {}
    for name, read, truth in (("vqa", reader.vqa, lambda item: item["answers"][0]), ("ve", reader.ve, lambda item: item["label"]),
                              ("nlvr2", reader.nlvr2, lambda item: item["label"]), ("rec", reader.rec, lambda item: item["target_index"])):  # fmt: skip
        test = world[TASKS[name].synthetic_table][split]
        scores[name] = float(np.mean([read(item) == truth(item) for item in test]))
    return scores


def retrieval_items(world: dict, split: str, num_images: int = 50) -> tuple[list, list]:
    """(the first `num_images` image ids of the split, the captions of those images): what retrieval scores."""
    table = world[TASKS["retrieval"].synthetic_table][split]
    images = list(dict.fromkeys(table["image_id"]))[:num_images]
    kept = set(images)
    return images, [item for item in table if item["image_id"] in kept]


def retrieval(world: dict, split: str = "test", num_images: int = 50, reader: RegionReader | None = None) -> dict:
    """Text->image R@1 over the first `num_images` images of the split (as `finetune.py --task retrieval`
    scores it): chance, and the region oracle, which ranks first, in random order, the images whose regions
    `RegionReader` finds the caption true of (`synthetic.caption_holds`). A text alone ranks no image, so
    its floor is chance. A caption true of k images caps R@1 at 1/k: the oracle is below 1 by design."""
    reader = reader or RegionReader(world)
    images, captions = retrieval_items(world, split, num_images)
    scenes = {image: SimpleNamespace(objects=reader.images[image]) for image in images}
    scores = []
    for item in captions:
        fits = [image for image, scene in scenes.items() if synthetic.caption_holds(item["text"], scene)]
        scores.append(float(item["image_id"] in fits) / max(1, len(fits)))
    return {"chance": 1 / len(scenes), "region oracle": float(np.mean(scores))}


def floors(world: dict, split: str = "test") -> dict[str, dict[str, float]]:
    """{task: {"chance": ..., <floor>: ...}} on `split`: per task with a class (text floors) or a region (tag
    floor) to predict, and text->image R@1 for retrieval. The readers learn from the train split."""
    reader = RegionReader(world)
    table, oracle = {}, region_oracle(world, split, reader)
    for task in TASKS.values():
        test = world[task.synthetic_table][split]
        if task.text_labels(test) is not None:
            table[task.name] = {"chance": chance(world, task, split), **text_floors(world, task, split)}
        elif task.target_column is not None:
            table[task.name] = {"chance": chance(world, task, split), "tags": tag_floor(world, task, split)}
        if task.name in table:
            table[task.name]["region oracle"] = oracle[task.name]
    table["retrieval"] = retrieval(world, split, reader=reader)
    return table


def floor(row: dict) -> float:
    """The floor a model's accuracy is read against: the best score that needs no image (the tags, for REC)."""
    return max(value for name, value in row.items() if name != "region oracle")


def gap_closed(accuracy: float, row: dict) -> float:
    """(accuracy - floor) / (region oracle - floor): 0 at the floor, 1 at the symbolic reader's ceiling."""
    return (accuracy - floor(row)) / (row["region oracle"] - floor(row))


def markdown(table: dict, world: dict, split: str = "test") -> str:
    columns = ["chance", "majority", "text lookup", "text classifier", "tags", "region oracle"]
    counts = world["world"]["counts"]
    lines = [f"| task | {split} items | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    items = {task: counts[TASKS[task].synthetic_table][split] for task in table}
    images, captions = retrieval_items(world, split)  # retrieval scores the first images only, as finetune.py does
    items["retrieval"] = f"{len(captions)} captions of {len(images)} images"
    for task, row in table.items():
        cells = [f"{row[c]:.3f}" if c in row else "" for c in columns]
        lines.append(f"| {task} | {items[task]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="test", choices=["validation", "test"], help="Where the floors are scored.")
    parser.add_argument("--output", default=None, help="Also write the table as JSON here.")
    args = parser.parse_args(argv)
    world = synthetic.load_world(synthetic.default_world(num_images=args.num_images, seed=args.seed))
    table = floors(world, args.split)
    print(markdown(table, world, args.split))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(table, f, indent=2)
    return table


if __name__ == "__main__":
    main()
