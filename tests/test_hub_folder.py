"""First contact: the folder `finetune.py --task vqa` writes is a complete Hub repo.

Its files pass the upload check, its card validates offline, and in a fresh Python without this project a
user gets the same answers about a photo from `pipeline(...)` and from the Inference Endpoint handler
that the folder ships.
"""

import json

import PIL.Image
from conftest import run_without_project
from huggingface_hub import ModelCard
from test_pipelines import QUESTIONS, assert_same_answers, detector_folder, expected_answers, photos  # noqa: F401  (fixtures)

from cmal.model_cards.render import validate_card
from cmal.modeling_cmal import CMALForQuestionAnswering
from cmal.processors import CMALProcessor
from cmal.training import finetune, region_extraction
from cmal.training.hub import hub_files


FRESH = """
import base64, json, sys
from transformers import pipeline
sys.path.insert(0, sys.argv[1])  # Endpoints import handler.py from the repo root
from handler import EndpointHandler

image, question = {image!r}, {question!r}
vqa = pipeline("visual-question-answering", model=sys.argv[1], trust_remote_code=True)
handler = EndpointHandler(sys.argv[1])
with open(image, "rb") as f:
    request = {{"inputs": {{"image": base64.b64encode(f.read()).decode(), "question": question}}, "parameters": {{"top_k": 2}}}}
print(json.dumps({{"pipeline": vqa(image=image, question=question, top_k=2), "handler": handler(request)}}))
"""


def test_finetuned_vqa_folder_is_a_complete_hub_repo(detector_folder, photos, tmp_path):  # noqa: F811
    model = CMALForQuestionAnswering.from_pretrained(detector_folder)
    processor = CMALProcessor.from_pretrained(detector_folder)
    region_extraction.extract(model.cmal, processor.image_processor, str(photos), str(tmp_path / "regions"))
    questions = [{"image_id": image, "question": q, "question_id": 10 * k + j}
                 for k, image in enumerate(["astronaut", "coffee"]) for j, q in enumerate(QUESTIONS)]  # fmt: skip
    given = {"astronaut": ["flag"] * 8 + ["no"] * 2, "coffee": ["cup"] * 6 + ["yes"] * 4}
    annotations = [{"question_id": q["question_id"], "answers": [{"answer": a} for a in given[q["image_id"]]]} for q in questions]
    for split in ("train", "val"):
        (tmp_path / f"{split}_questions.json").write_text(json.dumps({"questions": questions}))
        (tmp_path / f"{split}_annotations.json").write_text(json.dumps({"annotations": annotations}))
    folder = tmp_path / "cmal-vqa"
    finetune.main([
        "--task", "vqa", "--model_name_or_path", str(detector_folder), "--regions", str(tmp_path / "regions"),
        "--train_file", str(tmp_path / "train_questions.json"), "--train_annotations", str(tmp_path / "train_annotations.json"),
        "--validation_file", str(tmp_path / "val_questions.json"),
        "--validation_annotations", str(tmp_path / "val_annotations.json"),
        "--min_answer_count", "1", "--max_train_steps", "3", "--per_device_train_batch_size", "4",
        "--output_dir", str(folder), "--report_to", "none",
    ])  # fmt: skip

    assert hub_files(str(folder)) == [
        "README.md", "anchor_lexicon.py", "config.json", "configuration_cmal.py", "eval_results.json", "handler.py",
        "image_processing_cmal.py", "legacy_cmal.py", "model.safetensors", "modeling_cmal.py", "pipeline_cmal.py",
        "processing_cmal.py", "processor_config.json", "requirements.txt", "tokenizer.json", "tokenizer_config.json",
        "train_results.json", "validation_cmal.py",
    ]  # fmt: skip
    eval_results = json.loads((folder / "eval_results.json").read_text())
    data = validate_card(ModelCard.load(folder / "README.md"), "vqa", eval_results)
    assert data.pipeline_tag == "visual-question-answering" and "custom_code" in data.tags
    assert data.eval_results[0].metric_value == eval_results["vqa_accuracy"]

    image = photos / "coffee.jpg"
    result = run_without_project(FRESH.format(image=str(image), question=QUESTIONS[1]), folder, tmp_path)
    assert result["handler"] == result["pipeline"]
    tuned = CMALForQuestionAnswering.from_pretrained(folder).eval()
    batch = CMALProcessor.from_pretrained(folder)(text=QUESTIONS[1], images=[PIL.Image.open(image)])
    assert_same_answers(result["pipeline"], expected_answers(tuned, batch, 2))
    assert {a["answer"] for a in result["pipeline"]} == {"cup", "flag"}  # the fine-tuned vocabulary, from id2label
