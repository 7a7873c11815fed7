"""The pipelines users call: `pipeline("visual-question-answering", model=folder, trust_remote_code=True)` on a
real photo (scikit-image's, tiny random detector) and on precomputed regions, the other heads' pipelines,
and the extraction/in-model parity of a model fine-tuned on an extracted region store."""

import base64
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import skimage.data
import torch
from conftest import REPO, readme_snippet, run_card_snippet, run_snippet, run_without_project
from test_detector import LABELS, cmal_config
from transformers import pipeline

from cmal.modeling_cmal import (
    CMALConfig,
    CMALForImageTextClassification,
    CMALForImageTextRetrieval,
    CMALForQuestionAnswering,
    CMALForReferringExpression,
    CMALForVisualReasoning,
)
from cmal.processors import CMALImageProcessor, CMALProcessor
from cmal.training import finetune, region_extraction
from cmal.training.data import synthetic
from cmal.training.data.region_store import load_region_store, row_to_regions
from cmal.training.data.tokenizer import build_word_tokenizer
from cmal.training.tasks import synthetic_texts


QUESTIONS = ["what is the person holding?", "is there a cup?", "what animal is this?", "is the cat sleeping?"]
ANSWERS = {0: "flag", 1: "yes", 2: "no", 3: "cat", 4: "cup"}


def word_processor(concept_names, **image_kwargs):
    tokenizer = build_word_tokenizer(QUESTIONS + ["a person on the left", "the cup is full", "two cats"])
    return CMALProcessor(CMALImageProcessor(concept_names=concept_names, **image_kwargs), tokenizer)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """scikit-image's astronaut and coffee photos, as JPEG files in a folder."""
    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee"):
        PIL.Image.fromarray(getattr(skimage.data, name)()).save(folder / f"{name}.jpg", quality=95)
    return folder


@pytest.fixture(scope="module")
def detector_folder(tmp_path_factory):
    """A (random) VQA checkpoint with a tiny random RT-DETR inside: it reads raw images."""
    folder = tmp_path_factory.mktemp("vqa-detector")
    processor = word_processor(LABELS, size={"height": 64, "width": 64})
    torch.manual_seed(0)
    model = CMALForQuestionAnswering(cmal_config(vocab_size=len(processor.tokenizer), id2label=ANSWERS))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def expected_answers(model, batch, top_k):
    with torch.no_grad():
        probabilities = model(**batch).logits[0].sigmoid()
    scores, ids = probabilities.topk(top_k)
    return [{"score": s, "answer": model.config.id2label[i]} for s, i in zip(scores.tolist(), ids.tolist())]


def assert_same_answers(got, expected, atol=1e-5):
    assert [g["answer"] for g in got] == [e["answer"] for e in expected]
    np.testing.assert_allclose([g["score"] for g in got], [e["score"] for e in expected], atol=atol)


def test_vqa_pipeline_answers_about_a_photo_without_the_project(detector_folder, photos, tmp_path):
    """A Hub user's view: only transformers and the checkpoint folder, `trust_remote_code=True`."""
    script = f"""
import json, sys
from transformers import pipeline
vqa = pipeline("visual-question-answering", model=sys.argv[1], trust_remote_code=True)
answers = vqa(image={str(photos / "astronaut.jpg")!r}, question={QUESTIONS[0]!r}, top_k=3)
print(json.dumps({{"pipeline": type(vqa).__name__, "answers": answers}}))
"""
    result = run_without_project(script, detector_folder, tmp_path)
    assert result["pipeline"] == "CMALVisualQuestionAnsweringPipeline"
    model = CMALForQuestionAnswering.from_pretrained(detector_folder).eval()
    processor = CMALProcessor.from_pretrained(detector_folder)
    batch = processor(text=QUESTIONS[0], images=[PIL.Image.open(photos / "astronaut.jpg")])
    assert_same_answers(result["answers"], expected_answers(model, batch, 3))
    assert {a["answer"] for a in result["answers"]} <= set(ANSWERS.values())


def test_fine_tuned_on_extracted_regions_answers_the_same_on_the_raw_photo(detector_folder, photos, tmp_path):
    """Extract regions offline, fine-tune on the store, then ask about the raw photo and its stored regions."""
    model = CMALForQuestionAnswering.from_pretrained(detector_folder)
    processor = CMALProcessor.from_pretrained(detector_folder)
    region_extraction.extract(model.cmal, processor.image_processor, str(photos), str(tmp_path / "regions"))
    store, _ = load_region_store(str(tmp_path / "regions"))
    assert sorted(store["image_id"]) == ["astronaut", "coffee"]
    questions = [{"image_id": image, "question": q, "question_id": 10 * k + j}
                 for k, image in enumerate(["astronaut", "coffee"]) for j, q in enumerate(QUESTIONS)]  # fmt: skip
    given = {"astronaut": ["flag"] * 8 + ["no"] * 2, "coffee": ["cup"] * 6 + ["yes"] * 4}
    annotations = [{"question_id": q["question_id"], "answers": [{"answer": a} for a in given[q["image_id"]]]} for q in questions]
    (tmp_path / "questions.json").write_text(json.dumps({"questions": questions}))
    (tmp_path / "annotations.json").write_text(json.dumps({"annotations": annotations}))
    finetune.main([
        "--task", "vqa", "--model_name_or_path", str(detector_folder), "--regions", str(tmp_path / "regions"),
        "--train_file", str(tmp_path / "questions.json"), "--train_annotations", str(tmp_path / "annotations.json"),
        "--min_answer_count", "1", "--max_train_steps", "4", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
        "--output_dir", str(tmp_path / "tuned"), "--report_to", "none",
    ])  # fmt: skip
    tuned = CMALForQuestionAnswering.from_pretrained(tmp_path / "tuned").eval()
    assert tuned.config.id2label == {0: "cup", 1: "flag"}  # the majority answers of the training questions
    assert not torch.equal(tuned.classifier[0].weight, model.classifier[0].weight)  # it was trained

    vqa = pipeline("visual-question-answering", model=str(tmp_path / "tuned"), trust_remote_code=True)
    rows = {row["image_id"]: row_to_regions(row) for row in store.with_format("numpy")}
    for name in ("astronaut", "coffee"):
        raw = vqa(image=str(photos / f"{name}.jpg"), question=QUESTIONS[1], top_k=2)
        stored = vqa(regions=rows[name], question=QUESTIONS[1], top_k=2)
        assert_same_answers(raw, stored, atol=2e-3)  # the store keeps features in float16


@pytest.fixture(scope="module")
def region_inputs():
    """Two images' precomputed regions in the dict form `CMALImageProcessor` takes."""
    rng = np.random.default_rng(0)
    boxes = np.array([[0, 0, 40, 30], [50, 20, 100, 90], [10, 50, 60, 100]], np.float32)
    return [dict(features=rng.normal(size=(3, 16)).astype(np.float32), boxes=boxes, image_size=(100, 100),
                 tags=["person", "cup", "cat"][: 3 - i] + ["dog"] * i, scores=[0.9, 0.8, 0.7]) for i in range(2)]  # fmt: skip


def save_head(head, folder, **config):
    processor = word_processor(["person", "cup", "cat", "dog"])
    values = dict(vocab_size=len(processor.tokenizer), visual_feat_dim=16, concept_names=["person", "cup", "cat", "dog"],
                  num_concepts=None, **config)  # fmt: skip
    torch.manual_seed(0)
    model = head(CMALConfig.from_preset("tiny", **values)).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def test_vqa_pipeline_on_precomputed_regions(region_inputs, tmp_path):
    model, processor = save_head(CMALForQuestionAnswering, tmp_path, id2label=ANSWERS)
    vqa = pipeline("visual-question-answering", model=str(tmp_path), trust_remote_code=True)
    answers = vqa(regions=region_inputs[0], question=QUESTIONS[1])  # top_k defaults to 5
    assert_same_answers(answers, expected_answers(model, processor(text=QUESTIONS[1], regions=[region_inputs[0]]), 5))
    as_dict = vqa({"regions": region_inputs[0], "question": QUESTIONS[1]}, top_k=2)
    assert as_dict == answers[:2]
    with pytest.raises(ValueError, match="This checkpoint has no detector, so it cannot read raw images"):
        vqa(image=PIL.Image.new("RGB", (32, 32)), question=QUESTIONS[1])
    with pytest.raises(ValueError, match="`question` must be a non-empty string, got None"):
        vqa(regions=region_inputs[0])


@pytest.fixture(scope="module")
def vqa_pipeline(region_inputs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vqa-head")
    save_head(CMALForQuestionAnswering, folder, id2label=ANSWERS)
    return pipeline("visual-question-answering", model=str(folder), trust_remote_code=True)


@pytest.mark.parametrize("call, message", [
    (lambda vqa, r: vqa(regions=r, question=QUESTIONS[1], top_k=-1), r"`top_k` must be an integer in \[1, inf\), got -1"),
    (lambda vqa, r: vqa(regions=r, question=QUESTIONS[1], top_k=0), r"`top_k` must be an integer in \[1, inf\), got 0"),
    (lambda vqa, r: vqa(regions=r, question=QUESTIONS[1], top_k=1.5), r"`top_k` must be an integer, got 1.5 \(float\)"),
    (lambda vqa, r: vqa(regions=r, question=QUESTIONS[1], top_k="3"), r"`top_k` must be an integer, got '3' \(str\)"),
    (lambda vqa, r: vqa([{"regions": r, "question": QUESTIONS[1]}, None]), r"`inputs\[1\]` must be a dict of this pipeline's keys .*, got NoneType"),
    (lambda vqa, r: vqa(["what?"]), r"`inputs\[0\]` must be a dict of this pipeline's keys \(image or regions, and question\), got str"),
    (lambda vqa, r: vqa(regions=r, question="   "), r"`question` must be a non-empty string"),
])  # fmt: skip
def test_a_malformed_pipeline_call_names_the_argument(vqa_pipeline, region_inputs, call, message):
    with pytest.raises(ValueError, match=message):
        call(vqa_pipeline, region_inputs[0])


def save_synthetic_vqa(world, folder):
    """A random tiny VQA model and processor for a synthetic world (its words, concepts, answers), saved."""
    processor = CMALProcessor(CMALImageProcessor(concept_names=synthetic.CONCEPT_NAMES),
                              build_word_tokenizer(synthetic_texts(world)), synthetic.synthetic_lexicon().to_dict())  # fmt: skip
    config = CMALConfig.from_preset("tiny", vocab_size=len(processor.tokenizer), visual_feat_dim=synthetic.FEATURE_DIM,
                                    concept_names=synthetic.CONCEPT_NAMES, num_concepts=None,
                                    id2label=dict(enumerate(synthetic.ANSWER_VOCABULARY)))  # fmt: skip
    torch.manual_seed(0)
    model = CMALForQuestionAnswering(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def test_vqa_pipeline_on_a_synthetic_scene(tmp_path):
    """The documented call on a scene of the synthetic world: `vqa(regions=row_to_regions(store row), question=...)`."""
    world = synthetic.load_world(synthetic.build_world(tmp_path / "world", num_images=3))
    question = world["vqa"]["train"][0]
    model, processor = save_synthetic_vqa(world, tmp_path / "model")
    vqa = pipeline("visual-question-answering", model=str(tmp_path / "model"), trust_remote_code=True)
    row = world["regions"].with_format("numpy")[list(world["regions"]["image_id"]).index(question["image_id"])]
    answers = vqa(regions=row_to_regions(row), question=question["question"], top_k=3)
    batch = processor(text=question["question"], regions=[row_to_regions(row)])
    assert (batch["token_concept_ids"] >= 0).any()  # the question names a shape: an anchor
    assert_same_answers(answers, expected_answers(model, batch, 3))
    assert {a["answer"] for a in answers} <= set(synthetic.ANSWER_VOCABULARY)


def test_entailment_pipeline_gives_every_label_with_its_probability(region_inputs, tmp_path):
    labels = {0: "entailment", 1: "neutral", 2: "contradiction"}
    model, processor = save_head(CMALForImageTextClassification, tmp_path, id2label=labels)
    ve = pipeline("visual-entailment", model=str(tmp_path), trust_remote_code=True)
    result = ve(regions=region_inputs[0], hypothesis="the cup is full")
    with torch.no_grad():
        probabilities = model(**processor(text="the cup is full", regions=[region_inputs[0]])).logits[0].softmax(-1)
    assert sorted(r["label"] for r in result) == sorted(labels.values())
    for r in result:
        assert r["score"] == pytest.approx(probabilities[model.config.label2id[r["label"]]].item(), abs=1e-6)
    assert result[0]["score"] >= result[1]["score"] >= result[2]["score"]


def test_referring_expression_pipeline_returns_the_referred_box(region_inputs, tmp_path):
    model, processor = save_head(CMALForReferringExpression, tmp_path)
    rec = pipeline("referring-expression", model=str(tmp_path), trust_remote_code=True)
    found = rec(regions=region_inputs[0], expression="the cup is full")
    with torch.no_grad():
        outputs = model(**processor(text="the cup is full", regions=[region_inputs[0]]))
    best = int(outputs.logits[0].argmax())
    assert found["region_index"] == best
    np.testing.assert_allclose(found["box"], outputs.predicted_boxes[0].tolist(), atol=1e-6)
    assert found["score"] == pytest.approx(outputs.logits[0].softmax(-1)[best].item(), abs=1e-6)
    boxes = region_inputs[0]["boxes"] / 100  # the processor orders regions by score: already in that order here
    np.testing.assert_allclose(found["box"], boxes[best], atol=1e-6)
    top = rec(regions=region_inputs[0], expression="the cup is full", top_k=3)
    assert [r["region_index"] for r in top] == outputs.logits[0].argsort(descending=True).tolist()


def test_visual_reasoning_pipeline_reads_two_images(region_inputs, tmp_path):
    model, processor = save_head(CMALForVisualReasoning, tmp_path, id2label={0: "false", 1: "true"})
    nlvr2 = pipeline("visual-reasoning", model=str(tmp_path), trust_remote_code=True)
    result = nlvr2(images=region_inputs, sentence="two cats")
    batch = processor(text=["two cats"] * 2, regions=region_inputs)
    names = set(processor.image_processor.model_input_names)
    batch = {k: v.unsqueeze(0) if k in names else v[:1] for k, v in batch.items()}
    with torch.no_grad():
        probabilities = model(**batch).logits[0].softmax(-1)
    assert {r["label"]: r["score"] for r in result} == pytest.approx({"false": probabilities[0].item(), "true": probabilities[1].item()})
    with pytest.raises(ValueError, match=r"`images` must be the two images \[left, right\] of NLVR2"):
        nlvr2(images=region_inputs[:1], sentence="two cats")


def test_retrieval_pipeline_ranks_images_and_texts(region_inputs, tmp_path):
    model, processor = save_head(CMALForImageTextRetrieval, tmp_path)
    retrieval = pipeline("image-text-retrieval", model=str(tmp_path), trust_remote_code=True)
    ranked = retrieval(text="a person on the left", images=region_inputs)
    with torch.no_grad():
        scores = model(**processor(text=["a person on the left"] * 2, regions=region_inputs)).scores
    assert [r["index"] for r in ranked] == scores.argsort(descending=True).tolist()
    np.testing.assert_allclose(sorted(r["score"] for r in ranked), sorted(scores.tolist()), atol=1e-6)
    texts = ["two cats", "the cup is full", "a person on the left"]
    top = retrieval(regions=region_inputs[1], texts=texts, top_k=2)
    with torch.no_grad():
        scores = model(**processor(text=texts, regions=[region_inputs[1]] * 3)).scores
    assert [r["index"] for r in top] == scores.argsort(descending=True)[:2].tolist()


@pytest.mark.parametrize("question, outside", [
    ("what is on the table?", "table"), ("what is in the picture?", "picture"), ("is there a person?", "person"),
    ("is the woman holding a cup?", "woman"), ("what color is the ball?", "color"), ("what colour is the ball?", None),
])  # fmt: skip
def test_vqa_pipeline_names_the_words_its_checkpoint_cannot_read(tmp_path, question, outside):
    """Words outside a word-level vocabulary reach the model as [UNK]: the answers carry them, in order, each once."""
    world = synthetic.load_world(synthetic.build_world(tmp_path / "world", num_images=3))
    _, processor = save_synthetic_vqa(world, tmp_path / "model")
    vqa = pipeline("visual-question-answering", model=str(tmp_path / "model"), trust_remote_code=True)
    answers = vqa(regions=row_to_regions(world["regions"].with_format("numpy")[0]), question=question, top_k=2)
    vocabulary = processor.tokenizer.get_vocab()
    words = question.rstrip("?").split()
    assert answers[0]["unknown_words"] == answers[1]["unknown_words"] == [w for w in words if w not in vocabulary]
    assert (outside in answers[0]["unknown_words"]) if outside else answers[0]["unknown_words"] == []


def test_vqa_pipeline_flags_an_image_its_detector_is_sure_of_nothing_in(tmp_path, detector_folder, photos):
    """`weak_detections`: no region scoring `confident_score` (0.5) or more. A world image's stored regions hold its
    objects (scores near 1); its distractor regions alone (scores below 0.5) and a photo read by a detector that
    was never trained are flagged."""
    world = synthetic.load_world(synthetic.build_world(tmp_path / "world", num_images=3))
    save_synthetic_vqa(world, tmp_path / "model")
    vqa = pipeline("visual-question-answering", model=str(tmp_path / "model"), trust_remote_code=True)
    regions = row_to_regions(world["regions"].with_format("numpy")[0])
    assert regions["scores"].max() >= 0.5 and regions["scores"].min() < 0.5
    assert not vqa(regions=regions, question="is there a ball?")[0]["weak_detections"]
    unsure = {key: value[regions["scores"] < 0.5] if isinstance(value, np.ndarray) else value for key, value in regions.items()}
    assert vqa(regions=unsure, question="is there a ball?")[0]["weak_detections"]
    assert not vqa(regions=unsure, question="is there a ball?", confident_score=0.0)[0]["weak_detections"]
    with pytest.raises(ValueError, match=r"`confident_score` must be a number in \[0, 1\], got 2"):
        vqa(regions=regions, question="is there a ball?", confident_score=2)
    raw = pipeline("visual-question-answering", model=str(detector_folder), trust_remote_code=True)
    assert all(answer["weak_detections"] for answer in raw(image=str(photos / "astronaut.jpg"), question=QUESTIONS[1]))


def test_the_synthetic_world_answered_from_pixels_end_to_end(synthetic_detector, tmp_path):
    """pretrain.py --detector, then fine-tuning VQA from it: the checkpoint carries the detector, fine-tuning read
    the world as that detector sees it, and the pipeline answers a rendered world image as it answers the
    image's stored detections."""
    from cmal.training import pretrain, pretrain_run

    world = ["--synthetic_images", "60"]
    pretrain.main([*world, "--detector", str(synthetic_detector), "--model_config", "tiny", "--output_dir",
                   str(tmp_path / "pre"), "--max_train_steps", "2", "--per_device_train_batch_size", "8",
                   "--report_to", "none", "--curriculum_epochs", "0"])  # fmt: skip
    finetune.main([*world, "--task", "vqa", "--model_name_or_path", str(tmp_path / "pre"), "--output_dir",
                   str(tmp_path / "vqa"), "--max_train_steps", "2", "--per_device_train_batch_size", "4",
                   "--per_device_eval_batch_size", "4", "--max_eval_samples", "8", "--report_to", "none"])  # fmt: skip
    tuned = CMALForQuestionAnswering.from_pretrained(tmp_path / "vqa")
    assert tuned.config.detector_config["model_type"] == "rt_detr" and tuned.config.visual_feat_dim == 64
    # what the detector measured travels with it (pre-training, then fine-tuning), and the card quotes it from there
    measured = json.loads((synthetic_detector / "eval_results.json").read_text())
    for folder in ("pre", "vqa"):
        assert json.loads((tmp_path / folder / "detector_results.json").read_text()) == measured
    assert "(COCO mAP@0.5 0.000, mAP@[.5:.95] 0.000 on 6 held-out images" in " ".join((tmp_path / "vqa" / "README.md").read_text().split())

    world_dir = synthetic.default_world(num_images=60, seed=0)
    # both cards' snippets, verbatim, on a rendered world image as their `photo.jpg`
    (tmp_path / "snippets").mkdir()
    PIL.Image.open(f"{world_dir}/images/synthetic-000007.png").convert("RGB").save(tmp_path / "snippets" / "photo.jpg")
    made = run_card_snippet(tmp_path / "pre", tmp_path / "snippets")
    assert 0 <= made["itm_score"] <= 1 and type(made["encoder"]).__name__ == "CMALModel"
    assert run_card_snippet(tmp_path / "vqa", tmp_path / "snippets")["answer"] in tuned.config.label2id
    corpus = pretrain_run.load_corpus(pretrain.parse_args([*world, "--detector", str(synthetic_detector)]))
    rows = corpus.regions.with_format("numpy")
    vqa = pipeline("visual-question-answering", model=str(tmp_path / "vqa"), trust_remote_code=True)
    for index in (0, 7):
        image = f"{world_dir}/images/synthetic-{index:06d}.png"
        raw = vqa(image=image, question="what colour is the ball?", top_k=3)
        stored = vqa(regions=row_to_regions(rows[index]), question="what colour is the ball?", top_k=3)
        assert_same_answers(raw, stored, atol=2e-3)  # the store keeps features in float16
    # the README's two pipeline snippets, verbatim, with this checkpoint as the folders their commands make
    top, inference = tmp_path / "readme-top", tmp_path / "readme-inference"
    top.mkdir(), inference.mkdir()
    shutil.copy(f"{world_dir}/images/synthetic-000001.png", top / "scene.png")
    answered = run_snippet(readme_snippet("Answer a question about an image"), "README.md", top, {"outputs/vqa-synthetic-detector": tmp_path / "vqa"})
    assert_same_answers(answered["_"], vqa(image=f"{world_dir}/images/synthetic-000001.png", question="what colour is the large ring?"))
    answered = run_snippet(readme_snippet("## Fine-tuning, evaluation and inference"), "README.md", inference,
                           {"outputs/cmal-vqa": tmp_path / "vqa"}, regions=row_to_regions(rows[7]))  # fmt: skip
    assert_same_answers(answered["_"], vqa(regions=row_to_regions(rows[7]), question="what colour is the ball?"))
    # the Endpoint handler and the Space answer the rendered image as the pipeline does
    from test_examples import load_example

    image = f"{world_dir}/images/synthetic-000007.png"
    expected = vqa(image=image, question="what colour is the ball?", top_k=3)
    handler = load_example("endpoint/handler.py").EndpointHandler(str(tmp_path / "vqa"))
    encoded = base64.b64encode(Path(image).read_bytes()).decode()
    assert_same_answers(handler({"inputs": {"image": encoded, "question": "what colour is the ball?"},
                                 "parameters": {"top_k": 3}}), expected)  # fmt: skip
    demo = load_example("space/app.py").build_demo(str(tmp_path / "vqa"))
    predict = next(f.fn for f in demo.fns.values() if f.name == "predict")
    answers, _, _ = predict(image, "what colour is the ball?", 3)
    assert answers == {a["answer"]: a["score"] for a in expected}
    # benchmarks/photo_vqa.py on that checkpoint: the same questions from pixels and from the stored detections
    sys.path.insert(0, str(REPO / "benchmarks"))
    import photo_vqa

    result = photo_vqa.evaluate(str(tmp_path / "vqa"), synthetic_images=60, max_questions=12)
    assert result["questions"] == 12 and 0 <= result["accuracy_from_pixels"] <= 1
    assert result["agreement"] >= 0.75  # float16 rounding in the store may flip a near tie of an untrained head
    assert sum(row["questions"] for row in result["per_type"].values()) == 12 and result["oracle"] >= 0.5  # the ruler's reader, learnt on this 60-image world's few regions
    # an untrained detector finds no object, so no reading of its regions can be learnt: no oracle on them
    assert result["oracle_on_detections"] is None and all(row["chance"] < 1 for row in result["per_type"].values())
    assert "| all | 12 |" in photo_vqa.markdown(result)
    smaller = photo_vqa.evaluate(str(tmp_path / "vqa"), synthetic_images=60, max_questions=12, image_side=64)
    assert smaller["image_side"] == 64 and smaller["accuracy_from_regions"] == result["accuracy_from_regions"]  # same store
