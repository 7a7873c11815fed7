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
* tags (REC): a uniform guess among the regions whose detected tag is the shape the expression names.

`TextBalancer` gives every text each of its labels equally often, so the text-only floors sit at chance;
`tests/test_floors.py` fails when one exceeds chance + 0.03.
"""

import argparse
import json
from collections import Counter

import numpy as np

from cmal.training.data import synthetic
from cmal.training.tasks import TASKS


def _groups(table) -> list:
    """The question type of each example where the world records one (VQA), else one group."""
    return table["question_type"] if "question_type" in table.column_names else [None] * len(table)


def chance(world: dict, task) -> float:
    """Test accuracy of a uniform guess among the labels an example's text can have, or among the regions
    of its image for a task that points at a region."""
    test = world[task.synthetic_table]["test"]
    if task.text_labels(test) is None:
        regions = {row["image_id"]: len(row["scores"]) for row in world["regions"].select_columns(["image_id", "scores"])}
        return float(np.mean([1 / regions[image_id] for image_id in test["image_id"]]))
    options = world["world"]["question_options"]
    labels = len(task.class_names) or len(set(task.text_labels(world[task.synthetic_table]["train"])))
    return float(np.mean([1 / (len(options[group]) if group else labels) for group in _groups(test)]))


def text_floors(world: dict, task) -> dict[str, float]:
    """Test accuracy of the majority label (per question type), the exact-text lookup and the n-gram classifier."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    train, test = world[task.synthetic_table]["train"], world[task.synthetic_table]["test"]
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


def tag_floor(world: dict, task) -> float:
    """REC by the detected tags alone: expected accuracy of a uniform pick among the regions tagged with the
    shape the expression names first (among all regions when none is)."""
    names = {word: synthetic.CONCEPT_NAMES.index(shape) for shape in synthetic.SHAPES
             for word in (shape, *synthetic.SHAPE_SYNONYMS.get(shape, []))}  # fmt: skip
    tags = {row["image_id"]: row["concept_ids"] for row in world["regions"].select_columns(["image_id", "concept_ids"])}
    scores = []
    for item in world[task.synthetic_table]["test"]:
        words = item[task.text_column].split()  # "the <attributes> <noun> [<relation> the <anchor>]": the first noun
        concept = next(names[w] for w in words if w in names)
        image_tags = np.asarray(tags[item["image_id"]])
        candidates = np.flatnonzero(image_tags == concept)
        if len(candidates) == 0:
            candidates = np.arange(len(image_tags))
        scores.append(float(item["target_index"] in candidates) / len(candidates))
    return float(np.mean(scores))


def floors(world: dict) -> dict[str, dict[str, float]]:
    """{task: {"chance": ..., <floor>: ...}} on the test split, for every task with a class (text floors) or a
    region (tag floor) to predict; retrieval, which ranks, has neither."""
    table = {}
    for task in TASKS.values():
        test = world[task.synthetic_table]["test"]
        if task.text_labels(test) is not None:
            table[task.name] = {"chance": chance(world, task), **text_floors(world, task)}
        elif task.target_column is not None:
            table[task.name] = {"chance": chance(world, task), "tags": tag_floor(world, task)}
    return table


def markdown(table: dict, world: dict) -> str:
    columns = ["chance", "majority", "text lookup", "text classifier", "tags"]
    counts = world["world"]["counts"]
    lines = ["| task | test items | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for task, row in table.items():
        cells = [f"{row[c]:.3f}" if c in row else "" for c in columns]
        lines.append(f"| {task} | {counts[task]['test']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="Also write the table as JSON here.")
    args = parser.parse_args(argv)
    world = synthetic.load_world(synthetic.default_world(num_images=args.num_images, seed=args.seed))
    table = floors(world)
    print(markdown(table, world))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(table, f, indent=2)
    return table


if __name__ == "__main__":
    main()
