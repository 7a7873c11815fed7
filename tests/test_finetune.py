"""training/finetune.py end to end: every task on the synthetic world and on tiny files in each real format."""

import json

import numpy as np
import pytest
import torch
from conftest import die_after_saving, run_card_snippet
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from test_downstream import write_json, write_lines

from cmal.modeling_cmal import CMALConfig, CMALForImageTextClassification
from cmal.processors import CMALProcessor
from cmal.training import finetune, finetune_run
from cmal.training.data import downstream, synthetic
from cmal.training.data.region_store import RegionStoreWriter, load_region_store
from cmal.training.model_setup import enable_activation_checkpointing
from cmal.training.tasks import TASKS


NAMES = ["cat", "dog"]
BOXES = np.array([[0.0, 0.0, 0.4, 0.4], [0.5, 0.5, 1.0, 1.0], [0.1, 0.6, 0.4, 0.9]], np.float32)
COCO = "COCO_train2014_{:012d}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A region store of COCO-, Flickr- and NLVR2-named images and the files of every task in its own format."""
    root = tmp_path_factory.mktemp("real")
    rng = np.random.default_rng(0)
    image_ids = [COCO.format(i) for i in range(1, 7)] + [str(100 + i) for i in range(6)]
    image_ids += [f"{split}-{k}-0-img{side}" for split, n in (("train", 4), ("dev", 2)) for k in range(n) for side in (0, 1)]
    with RegionStoreWriter(str(root / "regions"), feature_dim=8, concept_names=NAMES, source="test") as writer:
        for image_id in image_ids:
            writer.add(dict(image_id=image_id, image_width=200, image_height=100, boxes=BOXES,
                            features=rng.normal(size=(3, 8)).astype(np.float32), concept_ids=rng.integers(0, 2, 3),
                            scores=[0.9, 0.8, 0.7]))  # fmt: skip
    files = {}
    for split, images in (("train", range(1, 5)), ("val", range(5, 7))):
        questions = [{"image_id": i, "question": q, "question_id": 10 * i + k}
                     for i in images for k, q in enumerate(["what animal is this?", "is there a dog?"])]  # fmt: skip
        annotations = [{"question_id": q["question_id"], "image_id": q["image_id"],
                        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": n + 1}
                                    for n, a in enumerate((["dog"] * 7 + ["cat"] * 3) if q["question_id"] % 10 == 0
                                                          else (["yes"] * 9 + ["no"]))]}
                       for q in questions]  # fmt: skip
        files[f"vqa_{split}"] = (write_json(root / f"v2_questions_{split}.json", {"questions": questions}),
                                 write_json(root / f"v2_annotations_{split}.json", {"annotations": annotations}))  # fmt: skip
    for split, ids in (("train", range(100, 104)), ("dev", range(104, 106))):
        rows = [{"Flickr30K_ID": str(i), "sentence1": "-", "sentence2": h, "gold_label": label, "pairID": f"{i}-{label}"}
                for i in ids for h, label in (("a dog is here.", "entailment"), ("the dog is old.", "neutral"),
                                              ("there is no animal.", "contradiction"))]  # fmt: skip
        files[f"ve_{split}"] = write_lines(root / f"snli_ve_{split}.jsonl", rows)
        pairs = [{"identifier": f"{split}-{k}-0-{s}", "sentence": text, "label": label}
                 for k in range(4 if split == "train" else 2)
                 for s, (text, label) in enumerate((("both images show a dog.", "True"), ("neither has a cat.", "False")))]  # fmt: skip
        files[f"nlvr2_{split}"] = write_lines(root / f"nlvr2_{split}.json", pairs)
    instances = {"images": [{"id": i, "width": 200, "height": 100, "file_name": COCO.format(i) + ".jpg"} for i in range(1, 7)],
                 "annotations": [{"id": 10 * i + r, "image_id": i, "category_id": 1,
                                  "bbox": [float(x1 * 200), float(y1 * 100), float((x2 - x1) * 200), float((y2 - y1) * 100)]}
                                 for i in range(1, 7) for r, (x1, y1, x2, y2) in enumerate(BOXES)],
                 "categories": [{"id": 1, "name": "dog"}]}  # fmt: skip
    refs = [{"ref_id": 10 * i + r, "ann_id": 10 * i + r, "image_id": i, "split": "train" if i < 5 else "val",
             "sentences": [{"sent": sentence, "sent_id": 0}]}
            for i in range(1, 7) for r, sentence in enumerate(["the top left dog", "the big dog at the bottom right"])]  # fmt: skip
    files["rec"] = (write_json(root / "refs.json", refs), write_json(root / "instances.json", instances))
    images = [{"filename": f"{100 + i}.jpg", "imgid": i, "split": split,
               "sentences": [{"raw": f"caption {k} of image {i}", "tokens": [], "sentid": 2 * i + k} for k in range(2)]}
              for i, split in enumerate(["train", "train", "restval", "train", "val", "val"])]  # fmt: skip
    files["retrieval"] = write_json(root / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})
    return root, files


def real_args(task, root, files):
    if task == "vqa":
        return ["--train_file", files["vqa_train"][0], "--train_annotations", files["vqa_train"][1],
                "--validation_file", files["vqa_val"][0], "--validation_annotations", files["vqa_val"][1],
                "--image_id_template", COCO, "--min_answer_count", "1"]  # fmt: skip
    if task in ("ve", "nlvr2"):
        return ["--train_file", files[f"{task}_train"], "--validation_file", files[f"{task}_dev"]]
    if task == "rec":
        return ["--train_file", files["rec"][0], "--train_annotations", files["rec"][1], "--image_id_template", COCO]
    return ["--train_file", files["retrieval"], "--retrieval_eval_images", "2"]


def common(output_dir, steps=3, *extra):
    return ["--model_config", "tiny", "--output_dir", str(output_dir), "--max_train_steps", str(steps),
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "3", "--report_to", "none",
            "--num_warmup_steps", "0", "--logging_steps", "1", *extra]  # fmt: skip


# What each card's snippet ends with, as the card's comments describe it.
SNIPPET_RESULTS = {
    "vqa": lambda made, config: made["answer"] in config.label2id,
    "ve": lambda made, config: made["label"] in config.label2id,
    "nlvr2": lambda made, config: made["label"] in config.label2id,
    "rec": lambda made, config: made["box"].shape == (4,) and bool(((made["box"] >= 0) & (made["box"] <= 1)).all()),
    "retrieval": lambda made, config: made["score"].dim() == 0 and bool(torch.isfinite(made["score"])),
}
EXPECTED_METRICS = {"vqa": {"vqa_accuracy"}, "ve": {"accuracy", "per_class_accuracy"}, "nlvr2": {"accuracy", "per_class_accuracy"},
                    "rec": {"accuracy", "mean_iou"}, "retrieval": {"text_to_image_r1", "image_to_text_r10", "rsum"}}  # fmt: skip


def check_output(folder, task, eval_samples):
    results = json.loads((folder / "eval_results.json").read_text())
    assert results["task"] == task and results["eval_samples"] == eval_samples
    assert EXPECTED_METRICS[task] <= set(results) and np.isfinite(results["eval_loss"])
    main = TASKS[task].main_metric
    assert 0 <= results[main] <= (600 if task == "retrieval" else 1)
    card = ModelCard.load(folder / "README.md")
    assert "custom_code" in card.data.tags and card.data.eval_results[0].metric_value == pytest.approx(results[main], abs=1e-4)
    assert (folder / "pipeline_cmal.py").is_file() and (folder / "processor_config.json").is_file()
    return results


@pytest.mark.parametrize("task", TASKS)
def test_each_task_on_its_real_format(task, corpus, tmp_path):
    root, files = corpus
    results = finetune.main(common(tmp_path / task) + ["--task", task] + real_args(task, root, files) + ["--regions", str(root / "regions")])
    eval_samples = {"vqa": 4, "ve": 6, "nlvr2": 4, "rec": 4, "retrieval": 2 * 2 * 2}[task]  # retrieval: 4 texts x 2 images
    check_output(tmp_path / task, task, eval_samples)
    assert results["steps"] == 3


@pytest.mark.parametrize("task", TASKS)
def test_each_task_on_the_synthetic_world(task, tmp_path):
    results = finetune.main(common(tmp_path / task) + ["--task", task, "--synthetic_images", "70", "--max_eval_samples", "12",
                                                       "--retrieval_eval_images", "3", "--synthetic_test"])  # fmt: skip
    config = CMALConfig.from_pretrained(tmp_path / task)
    assert config.architectures == [TASKS[task].head.__name__]
    if task == "vqa":  # the answer vocabulary comes from the training split
        assert set(config.label2id) <= set(synthetic.ANSWER_VOCABULARY) and {"yes", "no"} <= set(config.label2id)
    # --synthetic_test: the test split scored once more, each item's share of the main metric kept
    test, saved = results["test"], json.loads((tmp_path / task / "test_results.json").read_text())
    assert saved == {"task": task, **test} and "item_scores" not in results["eval"]
    table = TASKS[task].synthetic_data(synthetic.load_world(synthetic.default_world(num_images=70)))["test"]
    items, (main, scale) = test["item_scores"], TASKS[task].item_main_metric
    if task == "retrieval":  # the texts of the 3 images scored
        scored = list(dict.fromkeys(table["image_id"]))[:3]
        assert len(items) == sum(image in scored for image in table["image_id"])
    else:
        assert len(items) == len(table)
    assert np.mean(items) * scale == pytest.approx(test[main])
    if task == "vqa":  # the main metric per question type, the mean of its items
        world = synthetic.load_world(synthetic.default_world(num_images=70))
        trained = set(world["vqa"]["train"]["image_id"])
        best = [max(row["scores"]) for row in world["regions"] if row["image_id"] in trained]
        assert config.region_confidence_floor == pytest.approx(np.percentile(best, 5))  # the pipeline's weak_detections
        types = table["question_type"]
        for kind in set(types):
            assert test[f"vqa_accuracy/{kind}"] == pytest.approx(np.mean([s for s, k in zip(items, types) if k == kind]))
        validation = {key.split("/")[1]: value for key, value in results["eval"].items() if "/" in key}
        card = " ".join((tmp_path / task / "README.md").read_text().split())
        assert validation and all(f"| {kind} | {value:.3f} |" in card for kind, value in validation.items())
    # the card's snippet, verbatim, against this folder (the regions: a world image's stored ones)
    row = synthetic.load_world(synthetic.default_world(num_images=70))["regions"].with_format("numpy")[0]
    width, height = int(row["image_width"]), int(row["image_height"])
    placeholders = dict(features=row["features"], boxes=row["boxes"] * [width, height, width, height], width=width,
                        height=height, tags=[synthetic.CONCEPT_NAMES[i] for i in row["concept_ids"]], scores=row["scores"])  # fmt: skip
    one = {"features": placeholders["features"], "boxes": placeholders["boxes"], "image_size": (width, height),
           "tags": placeholders["tags"], "scores": placeholders["scores"]}  # fmt: skip
    made = run_card_snippet(tmp_path / task, tmp_path / "snippet", **placeholders, left=one, right=one, candidates=[one, one])
    assert "up to 40 whole words ([CLS] and [SEP] included)" in (tmp_path / task / "README.md").read_text()
    assert SNIPPET_RESULTS[task](made, config), {key: made.get(key) for key in ("answer", "label", "box", "score")}


def test_an_empty_split_is_a_clear_error(tmp_path):
    """20 images (10 twin families) leave 2 for validation, neither with two objects of one shape: REC has
    nothing to score there."""
    with pytest.raises(ValueError, match="validation split of REC has no examples"):
        finetune.main(common(tmp_path) + ["--task", "rec", "--synthetic_images", "20"])


def test_evaluation_equals_the_metric_computed_by_hand(corpus, tmp_path):
    """The gathered predictions are in dataset order: recompute VE accuracy example by example."""
    root, files = corpus
    finetune.main(common(tmp_path, 6) + ["--task", "ve"] + real_args("ve", root, files) + ["--regions", str(root / "regions")])
    model = CMALForImageTextClassification.from_pretrained(tmp_path).eval()
    processor = CMALProcessor.from_pretrained(tmp_path)
    table = downstream.read_snli_ve(files["ve_dev"])
    examples = downstream.TaskExamples(TASKS["ve"], table, load_region_store(str(root / "regions"))[0])
    correct = []
    for k in range(len(examples)):
        batch = downstream.TaskCollator(processor, TASKS["ve"], examples)([examples[k]])
        with torch.no_grad():
            correct.append(int(model(**batch).logits.argmax(-1).item() == table["label"][k]))
    results = json.loads((tmp_path / "eval_results.json").read_text())
    assert results["accuracy"] == pytest.approx(sum(correct) / len(correct))


def test_eval_steps_give_a_learning_curve_without_changing_the_training(corpus, tmp_path):
    root, files = corpus
    data = ["--task", "ve", *real_args("ve", root, files), "--regions", str(root / "regions")]
    plain = finetune.main(common(tmp_path / "plain", 6) + data)
    curved = finetune.main(common(tmp_path / "curved", 6, "--eval_steps", "2") + data)
    assert [point["step"] for point in curved["learning_curve"]] == [2, 4, 6]
    assert curved["learning_curve"][-1] == {"step": 6, **curved["eval"]}
    assert plain["eval"]["eval_loss"] == pytest.approx(curved["eval"]["eval_loss"], rel=1e-5)
    assert len(plain["learning_curve"]) == 1
    saved = json.loads((tmp_path / "curved" / "train_results.json").read_text())
    assert saved["learning_curve"][0]["accuracy"] == curved["learning_curve"][0]["accuracy"]
    weights = [CMALForImageTextClassification.from_pretrained(tmp_path / name).state_dict() for name in ("plain", "curved")]
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value)


def test_loss_falls_from_scratch_and_from_a_pretrained_folder(corpus, tmp_path):
    root, files = corpus
    # SNLI-VE's hypotheses here decide the label alone: a model that learns at all fits them. Without
    # dropout, whose noise hides the small input-dependence of a freshly initialised [CLS] for many steps.
    config = CMALConfig.from_preset("tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config.to_json_file(tmp_path / "tiny.json")
    args = real_args("ve", root, files) + ["--task", "ve", "--regions", str(root / "regions"), "--learning_rate", "2e-3",
                                           "--model_config", str(tmp_path / "tiny.json")]  # fmt: skip
    # 60 steps: at 40 the loss ratio sat at 0.53-0.54 over seeds 0-3, at 60 at 0.32-0.45 (measured)
    scratch = finetune.main(common(tmp_path / "scratch", 60, "--logging_steps", "5", "--per_device_train_batch_size", "12") + args)
    assert scratch["final_losses"]["loss"] < 0.5 * scratch["first_losses"]["loss"]
    tuned = finetune.main(common(tmp_path / "again", 5, "--logging_steps", "5", "--model_name_or_path", str(tmp_path / "scratch")) + args)
    assert tuned["first_losses"]["loss"] < scratch["first_losses"]["loss"]  # it starts from what it learnt


def test_a_killed_run_resumes_to_the_same_weights(corpus, tmp_path, monkeypatch):
    root, files = corpus
    args = real_args("rec", root, files) + ["--task", "rec", "--regions", str(root / "regions"), "--checkpointing_steps", "2"]
    finetune.main(common(tmp_path / "whole", 6) + args)

    undo = die_after_saving(monkeypatch, 4)
    with pytest.raises(SystemExit, match="130"):  # an interrupt ends the run with a resume hint (test_output_dir.py)
        finetune.main(common(tmp_path / "killed", 6) + args)
    undo()
    resumed = finetune.main(common(tmp_path / "killed", 6) + args + ["--resume_from_checkpoint", "latest"])
    assert resumed["steps"] == 6
    whole, again = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "killed" / "model.safetensors")
    for name in whole:
        torch.testing.assert_close(again[name], whole[name], msg=name)


def test_validation_images_can_have_their_own_id_template(corpus):
    """VQA's val2014 questions name COCO_val2014_* images: one template for both splits could never match."""
    root, files = corpus
    argv = ["--task", "vqa", *real_args("vqa", root, files), "--regions", str(root / "regions")]
    args = finetune.parse_args(argv + ["--validation_image_id_template", "val-{}"])
    train, validation, *_ = finetune_run.load_data(args, TASKS["vqa"])
    assert train["image_id"][0] == COCO.format(1) and sorted(set(validation["image_id"])) == ["val-5", "val-6"]
    _, validation, *_ = finetune_run.load_data(finetune.parse_args(argv), TASKS["vqa"])  # default: --image_id_template
    assert sorted(set(validation["image_id"])) == [COCO.format(5), COCO.format(6)]


def test_argument_errors(tmp_path, corpus, capsys):
    root, files = corpus
    regions = ["--regions", str(root / "regions")]
    for argv, message in [
        (["--train_file", files["vqa_train"][0]], "real data (--train_file) needs --regions"),
        (regions, "--validation_file, --train_annotations and --regions need --train_file"),
        (["--train_file", files["vqa_train"][0], *regions, "--validation_file", files["vqa_val"][0]],
         "VQA --validation_file needs --validation_annotations"),
        (["--train_file", files["vqa_train"][0], *regions, "--synthetic_test"], "--synthetic_test scores the synthetic world's test split"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit):
            finetune.parse_args(["--task", "vqa", *argv])
        assert message in capsys.readouterr().err
    other = tmp_path / "other"
    with RegionStoreWriter(str(other), feature_dim=5, concept_names=NAMES, source="test") as writer:
        writer.add(dict(image_id="x", image_width=2, image_height=2, boxes=BOXES[:1], features=np.zeros((1, 5), np.float32),
                        concept_ids=[0], scores=[1.0]))  # fmt: skip
    finetune.main(common(tmp_path / "pre", 1) + ["--task", "ve"] + real_args("ve", root, files) + ["--regions", str(root / "regions")])
    with pytest.raises(ValueError, match=r"reads 8-d regions .* but the region store has 5-d features"):
        finetune.main(common(tmp_path / "mismatch", 1) + ["--task", "retrieval", "--model_name_or_path", str(tmp_path / "pre"),
                                                          "--train_file", files["retrieval"], "--regions", str(other)])  # fmt: skip


def test_activation_checkpointing_by_its_current_name(corpus, tmp_path, recwarn):
    root, files = corpus
    finetune.main(common(tmp_path, 2, "--gradient_checkpointing") + ["--task", "ve", "--regions", str(root / "regions")]
                  + real_args("ve", root, files))  # fmt: skip
    assert not [w for w in recwarn if "gradient_checkpointing_enable" in str(w.message)]  # the deprecated name warns

    class OnlyTheOldName:  # transformers 5.0
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            self.kwargs = gradient_checkpointing_kwargs

    model = OnlyTheOldName()
    enable_activation_checkpointing(model)
    assert model.kwargs == {"use_reentrant": False}
