"""Downstream task data: readers for the real annotation formats, and the dataset + collator that join a
task table to a region store and make each head's inputs and labels.

Every reader returns a `datasets.Dataset` in one canonical layout per task, the layout the synthetic
world writes too, so training and evaluation never look at the original format:

| task | columns |
|---|---|
| vqa | image_id, question, answers (the annotators' raw answers, usually 10) |
| ve | image_id, hypothesis, label (0 entailment, 1 neutral, 2 contradiction) |
| nlvr2 | left_image_id, right_image_id, sentence, label (1 true) |
| rec | image_id, expression, target_box (x1, y1, x2, y2 normalised to [0, 1]) |
| retrieval | image_id, text |

A table may carry more columns (VQA's `question_id`, RefCOCO's `ref_id`, the synthetic world's
`question_type` and `target_index`); training and evaluation do not read them. Which columns a task
reads, and how, is its record in `training/tasks.py`.

`image_id` values are the ids of the region store (`training/extract_regions.py` uses the image's
path relative to the image folder, without extension); `image_id_template` maps the ids of an
annotation file onto them, e.g. `"COCO_train2014_{:012d}"` for VQA v2's integer COCO ids.
"""

import json
import os
from collections import Counter

import datasets
import torch
from torch.utils.data import Dataset

from cmal.training.metrics import import_metric_module

from .epochs import TrainingData
from .labels import NLVR2_LABELS, VE_LABELS
from .pretraining import example_rng, other_image
from .region_store import RegionReader
from .safe_pickle import load_data_pickle


_normalize_answer = import_metric_module("vqa_accuracy").normalize_answer


def _json_lines(path: str, fields: tuple[str, ...]) -> list[tuple[int, dict]]:
    """(line number, object) of a file of one JSON object per line with `fields` (SNLI-VE `.jsonl`, NLVR2
    `.json`); a broken line or a missing field is named by file and line."""
    items = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if line.strip():
            items.append((number, _checked(_parse_json(line, f"{path}:{number}"), fields, f"{path}:{number}")))
    return items


def _read_text(path: str) -> str:
    """A JSON file's text; one in another encoding than UTF-8 (a UTF-16 export) is named, not a bare decode error."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        found = " (it starts with a UTF-16 byte-order mark)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise ValueError(f"{path}: not UTF-8 text{found}: byte {error.start} cannot be decoded; JSON files are UTF-8, "
                         "re-save it as UTF-8") from None


def _parse_json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error})") from None


def _load_json(path: str, key: str | None = None):
    """A JSON file (its `key` entry when given), errors naming the file: a wrong file fails here, not as a
    bare `KeyError` later."""
    data = _parse_json(_read_text(path), path)
    if key is None:
        return data
    if not isinstance(data, dict) or key not in data:
        got = f"keys {sorted(data)[:8]}" if isinstance(data, dict) else f"a {type(data).__name__}"
        raise ValueError(f"{path}: expected a JSON object with {key!r}, got {got}: is it the right file?")
    return data[key]


def _image_id(template: str, image_id, **fields) -> str:
    """A file's image id mapped onto the store's by `--image_id_template` (`{}` is the id; Karpathy also `{filepath}`)."""
    try:
        return template.format(image_id, **fields)
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"--image_id_template {template!r} cannot format the image id {image_id!r} ({error!r}); it takes "
                         f"`{{}}` for the id{''.join(f' and {{{name}}}' for name in fields)}") from None


def _checked(item, fields: tuple[str, ...], where: str):
    """`item` if it is an object with every one of `fields`, else a ValueError naming the record."""
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
    missing = [field for field in fields if field not in item]
    if missing:
        raise ValueError(f"{where}: the record lacks {missing}; it has {sorted(item)[:8]}")
    return item


def _unique(records: list[dict], field: str, where: str) -> None:
    """Refuse a `field` value two records share (a lookup by it would silently keep one), naming both."""
    first = {}
    for i, record in enumerate(records):
        if record[field] in first:
            raise ValueError(f"{where}[{first[record[field]]}] and [{i}] have the same {field} {record[field]!r}: "
                             "each must be unique (a merged or repeated file?)")  # fmt: skip
        first[record[field]] = i


def _text(value, where: str, field: str) -> str:
    """A non-blank string (an empty question or sentence would be read as `[CLS] [SEP]`)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: `{field}` must be a non-empty text, got {value!r}")
    return value


def _from_rows(rows: list[dict], columns: list[str], path: str) -> datasets.Dataset:
    if not rows:
        raise ValueError(f"{path!r} holds no examples for the requested split")
    return datasets.Dataset.from_dict({c: [row[c] for row in rows] for c in columns})


# ------------------------------------------------------------------------------------------------
# Readers of the real formats
# ------------------------------------------------------------------------------------------------


def read_vqa_v2(questions_path: str, annotations_path: str | None = None, image_id_template: str = "{}") -> datasets.Dataset:
    """VQA v2: `v2_OpenEnded_mscoco_*_questions.json` and, except for test, `v2_mscoco_*_annotations.json`.

    Questions without annotations (the test split) get `answers=[]`.
    """
    questions = [_checked(q, ("question_id", "image_id", "question"), f"{questions_path}, questions[{i}]")
                 for i, q in enumerate(_load_json(questions_path, "questions"))]  # fmt: skip
    _unique(questions, "question_id", f"{questions_path}, questions")
    for i, q in enumerate(questions):
        _text(q["question"], f"{questions_path}, questions[{i}]", "question")
    answers = {}
    if annotations_path:
        annotations = [_checked(a, ("question_id", "answers"), f"{annotations_path}, annotations[{i}]")
                       for i, a in enumerate(_load_json(annotations_path, "annotations"))]  # fmt: skip
        _unique(annotations, "question_id", f"{annotations_path}, annotations")
        for i, a in enumerate(annotations):
            if not isinstance(a["answers"], list) or not all(isinstance(x, dict) and "answer" in x for x in a["answers"]):
                raise ValueError(f"{annotations_path}, annotations[{i}]: `answers` must be a list of objects with "
                                 f"'answer' (VQA v2's format), got {str(a['answers'])[:80]}")  # fmt: skip
        answers = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in annotations}
        missing = [q["question_id"] for q in questions if q["question_id"] not in answers]
        if missing:
            raise ValueError(f"{len(missing)} questions of {questions_path!r} have no annotation, e.g. {missing[:3]}")
    rows = [{"image_id": _image_id(image_id_template, q["image_id"]), "question_id": q["question_id"],
             "question": q["question"], "answers": answers.get(q["question_id"], [])} for q in questions]  # fmt: skip
    return _from_rows(rows, ["image_id", "question_id", "question", "answers"], questions_path)


def vqa_answer_vocabulary(answers: list[list[str]], min_count: int = 9) -> list[str]:
    """Answers (normalised) that are the majority answer of at least `min_count` questions, most frequent first.

    The bottom-up-attention recipe (9 on VQA v2 train gives the usual 3,129 answers).
    """
    majority = Counter(Counter(_normalize_answer(a) for a in given).most_common(1)[0][0] for given in answers if given)
    return [a for a, n in sorted(majority.items(), key=lambda item: (-item[1], item[0])) if n >= min_count]


def vqa_soft_scores(answers: list[str]) -> dict[str, float]:
    """min(#annotators who gave the (normalised) answer / 3, 1) for each answer given."""
    return {a: min(n / 3.0, 1.0) for a, n in Counter(_normalize_answer(a) for a in answers).items()}


def read_snli_ve(path: str, image_id_template: str = "{}") -> datasets.Dataset:
    """SNLI-VE jsonl (`snli_ve_{train,dev,test}.jsonl`): Flickr30K_ID, sentence2 (the hypothesis), gold_label."""
    rows = []
    for line_number, item in _json_lines(path, ("Flickr30K_ID", "sentence2", "gold_label")):
        if item["gold_label"] not in VE_LABELS:
            raise ValueError(f"{path}:{line_number}: gold_label must be one of {VE_LABELS}, got {item['gold_label']!r}")
        rows.append({"image_id": _image_id(image_id_template, item["Flickr30K_ID"]), "hypothesis": _text(item["sentence2"], f"{path}:{line_number}", "sentence2"),
                     "label": VE_LABELS.index(item["gold_label"])})  # fmt: skip
    return _from_rows(rows, ["image_id", "hypothesis", "label"], path)


def read_nlvr2(path: str, image_id_template: str = "{}") -> datasets.Dataset:
    """NLVR2 json lines (`train.json`, `dev.json`, `test1.json`): identifier, sentence, label "True"/"False".

    An identifier `dev-850-0-1` names the images `dev-850-0-img0` (left) and `dev-850-0-img1` (right).
    """
    rows = []
    for line_number, item in _json_lines(path, ("identifier", "sentence", "label")):
        label = str(item["label"]).lower()
        if label not in NLVR2_LABELS:
            raise ValueError(f"{path}:{line_number}: label must be 'True' or 'False', got {item['label']!r}")
        pair = item["identifier"].rsplit("-", 1)[0]
        rows.append({"left_image_id": _image_id(image_id_template, f"{pair}-img0"),
                     "right_image_id": _image_id(image_id_template, f"{pair}-img1"),
                     "sentence": _text(item["sentence"], f"{path}:{line_number}", "sentence"), "label": NLVR2_LABELS.index(label)})  # fmt: skip
    return _from_rows(rows, ["left_image_id", "right_image_id", "sentence", "label"], path)


def read_refcoco(refs_path: str, instances_path: str, split: str, image_id_template: str = "{}") -> datasets.Dataset:
    """RefCOCO/RefCOCO+/RefCOCOg: `refs(unc).p` (a pickle, or the same list as JSON) and `instances.json`.

    One row per referring sentence of the refs whose `split` is `split` (train, val, testA, testB,
    test); the target is the referred annotation's box, normalised by the image size. Training
    labels the region of the store that overlaps it most, so ground-truth-box stores and detected
    stores are read the same way.
    """
    if instances_path is None:
        raise ValueError("RefCOCO needs the COCO `instances.json` as its annotations file")
    # the official refs files are pickles: read without running code
    refs = _load_json(refs_path) if refs_path.endswith(".json") else load_data_pickle(refs_path)
    if not isinstance(refs, list):
        raise ValueError(f"{refs_path}: expected a list of refs, got a {type(refs).__name__}")
    refs = [_checked(ref, ("ref_id", "image_id", "ann_id", "split", "sentences"), f"{refs_path}, ref {i}")
            for i, ref in enumerate(refs)]  # fmt: skip
    images = [_checked(image, ("id", "width", "height"), f"{instances_path}, images[{i}]")
              for i, image in enumerate(_load_json(instances_path, "images"))]  # fmt: skip
    annotations = [_checked(a, ("id", "bbox"), f"{instances_path}, annotations[{i}]")
                   for i, a in enumerate(_load_json(instances_path, "annotations"))]  # fmt: skip
    _unique(images, "id", f"{instances_path}, images")
    _unique(annotations, "id", f"{instances_path}, annotations")
    for i, image in enumerate(images):
        for field in ("width", "height"):
            if isinstance(image[field], bool) or not isinstance(image[field], (int, float)) or not image[field] > 0:
                raise ValueError(f"{instances_path}, images[{i}] (id {image['id']!r}): `{field}` must be a positive "
                                 f"number of pixels, got {image[field]!r}")  # fmt: skip
    for i, a in enumerate(annotations):
        box = a["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
                and box[2] > 0 and box[3] > 0):  # fmt: skip
            raise ValueError(f"{instances_path}, annotations[{i}] (id {a['id']!r}): `bbox` must be COCO's [x, y, width, "
                             f"height] with a positive width and height, got {box!r}")  # fmt: skip
    images = {image["id"]: image for image in images}
    boxes = {a["id"]: a["bbox"] for a in annotations}
    unknown = [(ref["ref_id"], "image_id" if ref["image_id"] not in images else "ann_id", ref["image_id"] if ref["image_id"] not in images else ref["ann_id"])
               for ref in refs if ref["image_id"] not in images or ref["ann_id"] not in boxes]  # fmt: skip
    if unknown:
        named = ", ".join(f"ref_id {ref_id}'s {field} {value!r}" for ref_id, field, value in unknown[:3])
        raise ValueError(f"{len(unknown)} refs of {refs_path} name an image or annotation that {instances_path} lacks, "
                         f"e.g. {named}: are they the same dataset?")  # fmt: skip
    rows = []
    for ref in refs:
        if ref["split"] != split:
            continue
        image = images[ref["image_id"]]
        x, y, w, h = boxes[ref["ann_id"]]
        box = [x / image["width"], y / image["height"], (x + w) / image["width"], (y + h) / image["height"]]
        for sentence in ref["sentences"]:
            rows.append({"image_id": _image_id(image_id_template, ref["image_id"]), "expression": _text(sentence.get("sent") if isinstance(sentence, dict) else sentence, f"{refs_path}, ref_id {ref['ref_id']}", "sent"),
                         "target_box": box, "ref_id": ref["ref_id"]})  # fmt: skip
    splits = sorted({ref["split"] for ref in refs})
    if not rows:
        raise ValueError(f"{refs_path!r} has no refs in split {split!r}; its splits are {splits}")
    return _from_rows(rows, ["image_id", "expression", "target_box", "ref_id"], refs_path)


def read_karpathy(path: str, split: str, image_id_template: str = "{}") -> datasets.Dataset:
    """Karpathy-split retrieval JSON (`dataset_coco.json`, `dataset_flickr30k.json`): one row per caption.

    `split` is train (with COCO's restval), val or test; image ids are the file names without extension,
    formatted by `image_id_template`, which may also name COCO's `{filepath}` (`val2014`): a store extracted
    from the COCO folder tree (`extract_regions.py`) is matched with `"{filepath}/{}"`.
    """
    images = [_checked(image, ("filename", "split", "sentences"), f"{path}, images[{i}]")
              for i, image in enumerate(_load_json(path, "images"))]  # fmt: skip
    wanted = {"train", "restval"} if split == "train" else {split}
    rows = [{"image_id": _image_id(image_id_template, os.path.splitext(image["filename"])[0], filepath=image.get("filepath", "")),
             "text": _text(sentence.get("raw") if isinstance(sentence, dict) else sentence, f"{path}, images[{i}]", "raw")}
            for i, image in enumerate(images) if image["split"] in wanted for sentence in image["sentences"]]  # fmt: skip
    return _from_rows(rows, ["image_id", "text"], path)


# ------------------------------------------------------------------------------------------------
# Datasets and the collator
# ------------------------------------------------------------------------------------------------


class TaskExamples(TrainingData, Dataset):
    """A task table joined to a region store: each item is a text, its image row(s) and its target.

    `task` is the task's record (`training/tasks.py`): which columns hold the text, the target and the images.
    """

    def __init__(self, task, table: datasets.Dataset, regions: datasets.Dataset):
        self.read_regions = RegionReader(regions)  # zero-copy views into the memory-mapped store
        self.num_images = len(regions)
        position = {image_id: i for i, image_id in enumerate(regions["image_id"])}
        ids = list(zip(*(table[c] for c in task.image_columns)))
        missing = sorted({i for pair in ids for i in pair} - set(position))
        if missing:
            raise ValueError(f"{len(missing)} images of the {task.name} data are missing from the region store, e.g. {missing[:3]}")
        self.image_rows = [[position[i] for i in pair] for pair in ids]
        self.texts = list(table[task.text_column])
        self.targets = list(table[task.target_column]) if task.target_column else [1] * len(self.texts)

    def __len__(self):
        return len(self.texts)

    def regions_of_images(self, rows: list[int]) -> list[dict]:
        return self.read_regions(rows)

    def __getitem__(self, index):
        return {"index": index, "epoch": self.epoch, "text": self.texts[index], "image_rows": self.image_rows[index],
                "target": self.targets[index]}  # fmt: skip


class RetrievalGrid(TrainingData, Dataset):
    """Every (text, image) pair of the first `num_images` images of a retrieval table and their texts.

    Scoring the whole grid gives the score matrix that recall@K is computed from; `references` is
    the column of each text's own image.
    """

    def __init__(self, examples: TaskExamples, num_images: int):
        images = list(dict.fromkeys(rows[0] for rows in examples.image_rows))[:num_images]
        column = {row: j for j, row in enumerate(images)}
        texts = [i for i, rows in enumerate(examples.image_rows) if rows[0] in column]
        self.examples, self.images, self.texts = examples, images, texts
        self.references = [column[examples.image_rows[i][0]] for i in texts]

    def __len__(self):
        return len(self.texts) * len(self.images)

    def regions_of_images(self, rows: list[int]) -> list[dict]:
        return self.examples.regions_of_images(rows)

    def __getitem__(self, index):
        t, j = divmod(index, len(self.images))
        text = self.texts[t]
        return {"index": index, "epoch": self.epoch, "text": self.examples.texts[text], "image_rows": [self.images[j]],
                "target": int(self.references[t] == j)}  # fmt: skip


def box_iou(boxes: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """IoU of `boxes` `[..., N, 4]` with one box `[..., 4]` per row (x1, y1, x2, y2)."""
    box = box.unsqueeze(-2)
    lo, hi = torch.maximum(boxes[..., :2], box[..., :2]), torch.minimum(boxes[..., 2:], box[..., 2:])
    inter = (hi - lo).clamp(min=0).prod(-1)
    area = lambda b: (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)  # noqa: E731
    return inter / (area(boxes) + area(box) - inter).clamp(min=1e-9)


class TaskCollator:
    """Items of `TaskExamples`/`RetrievalGrid` -> the head's inputs and `labels`, made by the task's record
    (`task.make_labels`: soft scores, a class, a region).

    Items with two image rows (NLVR2) get an image axis of size 2 on their region inputs. With
    `negative_probability`, an item's image is replaced by another one (label 0: a mismatched pair for
    retrieval's matching head), drawn from a generator seeded by (seed, epoch, index) as in pre-training (the
    epoch each item carries: `TrainingData.set_epoch`).
    """

    def __init__(self, processor, task, dataset, label2id: dict | None = None, max_length: int = 40,
                 negative_probability: float = 0.0, seed: int = 0):  # fmt: skip
        self.processor, self.task, self.dataset = processor, task, dataset
        self.label2id, self.max_length = label2id, max_length
        self.negative_probability, self.seed = negative_probability, seed

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        texts = [item["text"] for item in items]
        rows = [list(item["image_rows"]) for item in items]
        targets = [item["target"] for item in items]
        if self.negative_probability:
            num_images = self.dataset.num_images
            for k, item in enumerate(items):
                rng = example_rng(self.seed, item["epoch"], item["index"])
                if num_images > 1 and rng.random() < self.negative_probability:
                    rows[k] = [other_image(rows[k][0], num_images, rng)]
                    targets[k] = 0
        per_image = len(rows[0])
        batch = self.processor(
            text=[t for t in texts for _ in range(per_image)],
            regions=self.dataset.regions_of_images([r for pair in rows for r in pair]),
            max_length=self.max_length,
        )
        batch = dict(batch)
        batch.pop("region_soft_labels", None)
        if per_image > 1:  # nlvr2: one text, two images
            visual = set(self.processor.image_processor.model_input_names)
            batch = {k: v.reshape(len(items), per_image, *v.shape[1:]) if k in visual else v[::per_image]
                     for k, v in batch.items()}  # fmt: skip
        batch["labels"] = self.task.make_labels(batch, targets, self.label2id)
        return batch
