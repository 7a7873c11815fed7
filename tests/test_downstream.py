"""Readers of the real downstream formats (tiny files written in each exact format) and the task collator."""

import json
import pickle

import numpy as np
import pytest
import torch
from datasets import Dataset

from cmal.training.data import downstream
from cmal.training.data.region_store import RegionStoreWriter, load_region_store
from cmal.training.tasks import TASKS


def write_json(path, data):
    path.write_text(json.dumps(data))
    return str(path)


def write_lines(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def vqa_files(tmp_path, split="train2014"):
    questions = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": split, "questions": [
        {"image_id": 1, "question": "What color is the dog?", "question_id": 10},
        {"image_id": 2, "question": "Is it raining?", "question_id": 20},
    ]}  # fmt: skip
    answers = {10: ["brown"] * 4 + ["Brown."] + ["tan"] * 2 + ["black", "dark brown", "brown dog"],
               20: ["no"] * 9 + ["yes"]}  # fmt: skip
    annotations = {"annotations": [
        {"question_id": qid, "image_id": qid // 10, "question_type": "what color is the", "answer_type": "other",
         "multiple_choice_answer": given[0],
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(given)]}
        for qid, given in answers.items()
    ]}  # fmt: skip
    return write_json(tmp_path / f"q_{split}.json", questions), write_json(tmp_path / f"a_{split}.json", annotations)


def test_vqa_v2_reader_soft_scores_and_vocabulary(tmp_path):
    questions, annotations = vqa_files(tmp_path)
    table = downstream.read_vqa_v2(questions, annotations, image_id_template="COCO_train2014_{:012d}")
    assert table["image_id"] == ["COCO_train2014_000000000001", "COCO_train2014_000000000002"]
    assert table["question"] == ["What color is the dog?", "Is it raining?"] and len(table[0]["answers"]) == 10
    # "Brown." normalises to "brown": 5 annotators -> 1.0; tan 2/3; the others 1/3
    assert downstream.vqa_soft_scores(table[0]["answers"]) == pytest.approx(
        {"brown": 1.0, "tan": 2 / 3, "black": 1 / 3, "dark brown": 1 / 3, "brown dog": 1 / 3}
    )
    assert downstream.vqa_soft_scores(table[1]["answers"]) == pytest.approx({"no": 1.0, "yes": 1 / 3})
    assert downstream.vqa_answer_vocabulary(table["answers"], min_count=1) == ["brown", "no"]
    assert downstream.vqa_answer_vocabulary(list(table["answers"]) + [["no"]], min_count=2) == ["no"]
    unanswered = downstream.read_vqa_v2(questions)  # the test split has no annotations
    assert unanswered["answers"] == [[], []]


def test_vqa_v2_reader_names_questions_without_annotations(tmp_path):
    questions, _ = vqa_files(tmp_path)
    annotations = write_json(tmp_path / "partial.json", {"annotations": []})
    with pytest.raises(ValueError, match="2 questions .* have no annotation"):
        downstream.read_vqa_v2(questions, annotations)


def test_snli_ve_reader(tmp_path):
    rows = [{"Flickr30K_ID": "100", "sentence1": "premise", "sentence2": f"hypothesis {label}", "gold_label": label,
             "pairID": f"p{k}"} for k, label in enumerate(["neutral", "entailment", "contradiction"])]  # fmt: skip
    table = downstream.read_snli_ve(write_lines(tmp_path / "snli_ve_train.jsonl", rows))
    assert table["image_id"] == ["100"] * 3 and table["label"] == [1, 0, 2]
    assert table["hypothesis"][0] == "hypothesis neutral"
    bad = write_lines(tmp_path / "bad.jsonl", [{**rows[0], "gold_label": "maybe"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: gold_label must be one of"):
        downstream.read_snli_ve(bad)


def test_nlvr2_reader(tmp_path):
    rows = [{"identifier": "dev-850-0-1", "sentence": "Both images have dogs.", "label": "True", "left_url": "u",
             "right_url": "v", "writer": 1, "synset": "dog", "query": "dog"},
            {"identifier": "dev-851-2-0", "sentence": "One image has a cat.", "label": "False"}]  # fmt: skip
    table = downstream.read_nlvr2(write_lines(tmp_path / "dev.json", rows))
    assert table["left_image_id"] == ["dev-850-0-img0", "dev-851-2-img0"]
    assert table["right_image_id"] == ["dev-850-0-img1", "dev-851-2-img1"]
    assert table["label"] == [1, 0]


def refcoco_files(tmp_path, as_pickle=True):
    instances = {"images": [{"id": 1, "width": 200, "height": 100, "file_name": "COCO_train2014_000000000001.jpg"}],
                 "annotations": [{"id": 7, "image_id": 1, "bbox": [20, 10, 100, 50], "category_id": 18},
                                 {"id": 8, "image_id": 1, "bbox": [0, 0, 10, 10], "category_id": 17}],
                 "categories": [{"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}]}  # fmt: skip
    refs = [{"ref_id": 0, "ann_id": 7, "image_id": 1, "split": "train", "category_id": 18, "sent_ids": [0, 1],
             "sentences": [{"sent": "the big dog", "raw": "The big dog", "tokens": ["the", "big", "dog"], "sent_id": 0},
                           {"sent": "dog on the right", "raw": "dog on the right", "tokens": [], "sent_id": 1}]},
            {"ref_id": 1, "ann_id": 8, "image_id": 1, "split": "testA", "category_id": 17, "sent_ids": [2],
             "sentences": [{"sent": "small cat", "raw": "small cat", "tokens": [], "sent_id": 2}]}]  # fmt: skip
    refs_path = tmp_path / ("refs(unc).p" if as_pickle else "refs.json")
    if as_pickle:
        refs_path.write_bytes(pickle.dumps(refs))
    else:
        refs_path.write_text(json.dumps(refs))
    return str(refs_path), write_json(tmp_path / "instances.json", instances)


@pytest.mark.parametrize("as_pickle", [True, False])
def test_refcoco_reader(tmp_path, as_pickle):
    refs, instances = refcoco_files(tmp_path, as_pickle)
    table = downstream.read_refcoco(refs, instances, "train", image_id_template="COCO_train2014_{:012d}")
    assert table["expression"] == ["the big dog", "dog on the right"]
    assert table["image_id"] == ["COCO_train2014_000000000001"] * 2
    np.testing.assert_allclose(table["target_box"][0], [0.1, 0.1, 0.6, 0.6])  # (20, 10, 120, 60) / (200, 100)
    assert downstream.read_refcoco(refs, instances, "testA")["expression"] == ["small cat"]
    with pytest.raises(ValueError, match=r"no refs in split 'val'; its splits are \['testA', 'train'\]"):
        downstream.read_refcoco(refs, instances, "val")


def karpathy_file(tmp_path):
    images = [{"filename": f"{100 + i}.jpg", "imgid": i, "split": split, "sentids": [2 * i, 2 * i + 1],
               "sentences": [{"raw": f"Caption {k} of image {i}.", "tokens": [], "imgid": i, "sentid": 2 * i + k}
                             for k in range(2)]}
              for i, split in enumerate(["train", "restval", "val", "test"])]  # fmt: skip
    return write_json(tmp_path / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})


def test_karpathy_reader(tmp_path):
    path = karpathy_file(tmp_path)
    train = downstream.read_karpathy(path, "train")
    assert train["image_id"] == ["100", "100", "101", "101"]  # restval joins train
    assert downstream.read_karpathy(path, "val")["text"] == ["Caption 0 of image 2.", "Caption 1 of image 2."]


def test_karpathy_coco_ids_can_keep_the_filepath(tmp_path):
    """dataset_coco.json names each image's folder (`filepath`); a store extracted from the COCO tree has it in its ids."""
    images = [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "split": "test",
               "sentences": [{"raw": "A man riding a bike."}]}]  # fmt: skip
    path = write_json(tmp_path / "dataset_coco.json", {"images": images, "dataset": "coco"})
    assert downstream.read_karpathy(path, "test")["image_id"] == ["COCO_val2014_000000391895"]
    assert downstream.read_karpathy(path, "test", "{filepath}/{}")["image_id"] == ["val2014/COCO_val2014_000000391895"]


def test_rec_needs_the_instances(tmp_path):
    refs, _ = refcoco_files(tmp_path)
    with pytest.raises(ValueError, match="RefCOCO needs the COCO `instances.json`"):
        TASKS["rec"].read(refs, None, "train")


# ------------------------------------------------------------------------------------------------
# Collator
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Three images, three regions each, with known boxes; the second region of img0 is the dog."""
    root = tmp_path_factory.mktemp("store")
    boxes = np.array([[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 1.0, 1.0], [0.1, 0.6, 0.4, 0.9]], np.float32)
    with RegionStoreWriter(str(root), feature_dim=8, concept_names=["cat", "dog"], source="test") as writer:
        for i in range(3):
            writer.add(dict(image_id=f"img{i}", image_width=10, image_height=10, features=np.full((3, 8), i, np.float32),
                            boxes=boxes, concept_ids=[0, 1, 0], scores=[0.9, 0.8, 0.7]))  # fmt: skip
    return load_region_store(str(root))[0]


@pytest.fixture(scope="module")
def processor():
    from cmal.processors import CMALImageProcessor, CMALProcessor
    from cmal.training.data.tokenizer import build_word_tokenizer

    tokenizer = build_word_tokenizer(["the dog is brown", "a cat and a dog", "what colour is the cat"])
    return CMALProcessor(CMALImageProcessor(concept_names=["cat", "dog"]), tokenizer)


def test_vqa_collator_makes_soft_scores(store, processor):
    table = Dataset.from_dict({"image_id": ["img0", "img1"], "question": ["what colour is the dog"] * 2,
                               "answers": [["brown"] * 2 + ["black"] * 8, ["white"] * 10]})  # fmt: skip
    examples = downstream.TaskExamples(TASKS["vqa"], table, store)
    label2id = {"black": 0, "brown": 1}
    batch = downstream.TaskCollator(processor, TASKS["vqa"], examples, label2id)([examples[0], examples[1]])
    torch.testing.assert_close(batch["labels"], torch.tensor([[1.0, 2 / 3], [0.0, 0.0]]))  # "white" is not in the vocabulary
    assert batch["visual_feats"].shape == (2, 3, 8) and "region_soft_labels" not in batch
    assert batch["token_concept_ids"][0].tolist().count(1) == 1  # "dog" is an anchor


def test_rec_collator_labels_the_region_that_overlaps_most(store, processor):
    table = Dataset.from_dict({"image_id": ["img0", "img2"], "expression": ["the dog", "the cat"],
                               "target_box": [[0.55, 0.5, 1.0, 0.95], [0.0, 0.0, 0.25, 0.2]]})  # fmt: skip
    examples = downstream.TaskExamples(TASKS["rec"], table, store)
    batch = downstream.TaskCollator(processor, TASKS["rec"], examples)([examples[0], examples[1]])
    # regions are ordered by score (0.9, 0.8, 0.7), so the stored order is kept
    assert batch["labels"].tolist() == [1, 0]


def test_nlvr2_collator_stacks_the_two_images(store, processor):
    table = Dataset.from_dict({"left_image_id": ["img0", "img1"], "right_image_id": ["img2", "img0"],
                               "sentence": ["a cat and a dog", "the dog"], "label": [1, 0]})  # fmt: skip
    examples = downstream.TaskExamples(TASKS["nlvr2"], table, store)
    batch = downstream.TaskCollator(processor, TASKS["nlvr2"], examples)([examples[0], examples[1]])
    assert batch["visual_feats"].shape == (2, 2, 3, 8) and batch["input_ids"].shape[0] == 2
    assert batch["visual_feats"][0, :, 0, 0].tolist() == [0.0, 2.0] and batch["visual_feats"][1, :, 0, 0].tolist() == [1.0, 0.0]
    assert batch["labels"].tolist() == [1, 0]


def test_retrieval_negatives_are_seeded_and_grid_covers_every_pair(store, processor):
    table = Dataset.from_dict({"image_id": ["img0", "img0", "img1", "img2"], "text": ["a cat", "the dog", "a dog", "cat"]})
    examples = downstream.TaskExamples(TASKS["retrieval"], table, store)
    collator = downstream.TaskCollator(processor, TASKS["retrieval"], examples, negative_probability=0.5, seed=3)
    items = [examples[i] for i in range(4)] * 8
    items = [{**item, "index": k} for k, item in enumerate(items)]
    first, again = collator(items), collator(items)
    assert torch.equal(first["labels"], again["labels"]) and torch.equal(first["visual_feats"], again["visual_feats"])
    labels = first["labels"]
    assert 0 < labels.sum() < len(items)
    own = torch.tensor([float(examples.image_rows[k % 4][0]) for k in range(len(items))])
    assert torch.equal(first["visual_feats"][:, 0, 0] == own, labels.bool())  # a 0 label is always another image

    grid = downstream.RetrievalGrid(examples, num_images=2)
    assert len(grid) == 3 * 2 and grid.references == [0, 0, 1]
    assert [grid[i]["target"] for i in range(len(grid))] == [1, 0, 1, 0, 0, 1]


def test_missing_images_are_named(store):
    table = Dataset.from_dict({"image_id": ["img0", "nope"], "hypothesis": ["x", "y"], "label": [0, 1]})
    with pytest.raises(ValueError, match=r"1 images of the ve data are missing from the region store, e.g. \['nope'\]"):
        downstream.TaskExamples(TASKS["ve"], table, store)


def epochs_of(items):
    return [item["epoch"] for item in items]


def test_the_epoch_reaches_the_items_made_in_workers(store):
    """`TrainingData.set_epoch` (what the loop calls) reaches items made in DataLoader workers, so the collator draws
    that epoch's negatives and masks while holding no epoch of its own."""
    from torch.utils.data import DataLoader

    table = Dataset.from_dict({"image_id": ["img0", "img1", "img2", "img0"], "text": ["a", "b", "c", "d"]})
    examples = downstream.TaskExamples(TASKS["retrieval"], table, store)
    loader = DataLoader(examples, batch_size=2, num_workers=2, collate_fn=epochs_of)
    assert [epoch for batch in loader for epoch in batch] == [0] * 4
    examples.set_epoch(3)
    assert [epoch for batch in loader for epoch in batch] == [3] * 4


def test_training_refuses_data_without_epochs():
    from types import SimpleNamespace

    from torch.utils.data import DataLoader

    from cmal.training.runtime import prepare_training

    run = SimpleNamespace(report_to="none", weight_decay=0.0, learning_rate=1e-3)
    with pytest.raises(TypeError, match="training reads a TrainingData .*got list"):
        prepare_training(None, run, torch.nn.Linear(2, 2), DataLoader([1, 2, 3]), "test")
