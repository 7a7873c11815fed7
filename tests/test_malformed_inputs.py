"""A battery of malformed inputs at every boundary a user reaches: each one fails at once with an error that
names the argument, field, file or record, says what was expected and what came. None is accepted silently.

(The model's forward inputs have their own table: test_input_validation.py.)
"""

import json
import os
import re

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import broken_images, tiny_config
from safetensors.torch import load_file, save_file

from cmal.modeling_cmal import CMALConfig, CMALModel
from cmal.modeling_cmal.configuration_cmal import _BOOL_FIELDS, _NUMBER_FIELDS
from cmal.processors import CMALImageProcessor
from cmal.training import finetune, pretrain
from cmal.training.convert_features import convert_npz, convert_tsv
from cmal.training.data import downstream


def config_cases():
    """Per numeric field: a string, a value below its range, above it (if bounded) and NaN for floats."""
    cases = []
    for name, (kind, low, high, low_excluded) in _NUMBER_FIELDS.items():
        wanted = "an integer" if kind is int else "a number"
        cases.append(({name: "8"}, rf"`{name}` must be {wanted}, got '8' \(str\)"))
        cases.append(({name: low - 1 if not low_excluded else low}, rf"`{name}` must be {wanted} in [\[(]{low}, "))
        if high is not None:
            cases.append(({name: high + 1}, rf"`{name}` must be {wanted} in \[{low}, {high}\], got {high + 1}"))
        if kind is float:
            cases.append(({name: float("nan")}, rf"`{name}` must be a number in .*, got nan"))
        if kind is int:
            cases.append(({name: 2.5}, rf"`{name}` must be an integer, got 2.5 \(float\)"))
    cases += [({name: "yes"}, rf"`{name}` must be true or false, got 'yes'") for name in _BOOL_FIELDS]
    return cases + [
        (dict(hidden_act="bogus"), r"`hidden_act` must be one of \[.*'gelu'.*\], got 'bogus'"),
        (dict(concept_names="dog"), r"`concept_names` must be a list of non-empty names, got 'dog'"),
        (dict(concept_names=["dog", ""]), r"`concept_names` must be a list of non-empty names, got \['dog', ''\]"),
        (dict(concept_names=["dog", 3]), r"`concept_names` must be a list of non-empty names"),
        (dict(pad_token_id=500), r"`pad_token_id` \(500\) must be below `vocab_size` \(99\)"),
        (dict(visual_pos_dim=5), r"`visual_pos_dim` must be 4, 6 or 7 .*, got 5"),
        (dict(id2label={0: "yes", 2: "no"}), r"`id2label` must number its labels 0..1, got ids \[0, 2\]"),
        (dict(id2label={0: "yes", 1: "yes"}), r"`id2label` must not repeat a label"),
        (dict(id2label={0: "yes", 1: "no"}, label2id={"yes": 1, "no": 0}),
         r"`label2id` must be the inverse of `id2label`; they disagree on \['no', 'yes'\]"),
        (dict(anchor_fill="zero"), r"`anchor_fill` must be 'swap' or 'mask', got 'zero'"),
        (dict(detector_num_regions=80, max_regions=50), r"`detector_num_regions` must be in \[1, max_regions=50\], got 80"),
    ]  # fmt: skip


@pytest.mark.parametrize("overrides, message", config_cases())
def test_config_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


TRAINING_ARGS = [
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size: expected a value in [1, inf), got '0'"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps: expected a value in [1, inf), got '0'"),
    (["--learning_rate", "-1"], "--learning_rate: expected a value in (0, inf), got '-1'"),
    (["--learning_rate", "0"], "--learning_rate: expected a value in (0, inf), got '0'"),
    (["--learning_rate", "nan"], "--learning_rate: expected a value in (0, inf), got 'nan'"),
    (["--learning_rate", "fast"], "--learning_rate: expected a number, got 'fast'"),
    (["--weight_decay", "-0.1"], "--weight_decay: expected a value in [0, inf), got '-0.1'"),
    (["--max_grad_norm", "0"], "--max_grad_norm: expected a value in (0, inf), got '0'"),
    (["--lr_scheduler_type", "cosin"], "--lr_scheduler_type: expected a transformers schedule (linear, cosine, "),
    (["--num_warmup_steps", "-5"], "--num_warmup_steps: expected a value in [0, inf), got '-5'"),
    (["--num_train_epochs", "0"], "--num_train_epochs: expected a value in [1, inf), got '0'"),
    (["--max_train_steps", "1.5"], "--max_train_steps: expected an integer, got '1.5'"),
    (["--mixed_precision", "fp8"], "--mixed_precision: invalid choice: 'fp8' (choose from "),
    (["--checkpointing_steps", "0"], "--checkpointing_steps: expected a value in [1, inf), got '0'"),
    (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit: expected a value in [1, inf), got '0'"),
    (["--seed", "-1"], "--seed: expected a value in [0, inf), got '-1'"),
    (["--num_workers", "-2"], "--num_workers: expected a value in [0, inf), got '-2'"),
    (["--logging_steps", "0"], "--logging_steps: expected a value in [1, inf), got '0'"),
]
PRETRAIN_ARGS = TRAINING_ARGS + [
    (["--dataset", "no-such-corpus"], "--dataset: expected 'synthetic' or a folder with regions/ and captions/"),
    (["--synthetic_images", "0"], "--synthetic_images: expected a value in [1, inf), got '0'"),
    (["--synthetic_seed", "-1"], "--synthetic_seed: expected a value in [0, inf), got '-1'"),
    (["--max_text_length", "2"], "--max_text_length: expected a value in [3, inf), got '2'"),
    (["--corpus_fraction", "0"], "--corpus_fraction: expected a value in (0, 1], got '0'"),
    (["--corpus_fraction", "1.5"], "--corpus_fraction: expected a value in (0, 1], got '1.5'"),
    (["--curriculum_epochs", "-1"], "--curriculum_epochs: expected a value in [0, inf), got '-1'"),
    (["--tokenizer", "./no-such-tokenizer"], "--tokenizer: no such folder: './no-such-tokenizer'"),
    (["--model_config", "smal"], "--model_config: expected a preset (tiny, mini, small, base) or a config JSON file, got 'smal'"),
    (["--init_text_from", "/no/such/bert"], "--init_text_from: no such folder: '/no/such/bert'"),
    (["--mlm", "-1"], "--mlm: expected a value in [0, inf), got '-1'"),
    (["--mrm", "nan"], "--mrm: expected a value in [0, inf), got 'nan'"),
    (["--itm", "inf"], "--itm: expected a value in [0, inf), got 'inf'"),
    (["--amc", "x"], "--amc: expected a number, got 'x'"),
    (["--itc", "-0.5"], "--itc: expected a value in [0, inf), got '-0.5'"),
    (["--amc_parts", "tokens"], "--amc_parts: invalid choice: 'tokens' (choose from "),
    (["--anchor_mask_prob", "2"], "--anchor_mask_prob: expected a value in [0, 1], got '2'"),
    (["--anchor_fill", "zero"], "--anchor_fill: invalid choice: 'zero' (choose from "),
    (["--mlm_probability", "1.5"], "--mlm_probability: expected a value in [0, 1], got '1.5'"),
    (["--mrm_probability", "-0.1"], "--mrm_probability: expected a value in [0, 1], got '-0.1'"),
    (["--itm_negative_probability", "3"], "--itm_negative_probability: expected a value in [0, 1], got '3'"),
    (["--itm_negative_window", "-5"], "--itm_negative_window: expected a value in [0, inf), got '-5'"),
    (["--streaming_shards", "0"], "--streaming_shards: expected a value in [1, inf), got '0'"),
    (["--streaming"], "--streaming: reads shards in order and draws no curriculum: pass --curriculum_epochs 0"),
]  # fmt: skip
FINETUNE_ARGS = TRAINING_ARGS + [
    (["--task", "vqa2"], "--task: invalid choice: 'vqa2' (choose from "),
    (["--train_file", "no-such.json"], "--train_file: no such file: 'no-such.json'"),
    (["--train_file", "."], "--train_file: no such file: '.' (a folder)"),
    (["--validation_file", "no-such.json"], "--validation_file: no such file: 'no-such.json'"),
    (["--train_annotations", "no-such.json"], "--train_annotations: no such file: 'no-such.json'"),
    (["--validation_annotations", "no-such.json"], "--validation_annotations: no such file: 'no-such.json'"),
    (["--regions", "no-such-store"], "--regions: no such folder: 'no-such-store'"),
    (["--min_answer_count", "0"], "--min_answer_count: expected a value in [1, inf), got '0'"),
    (["--synthetic_images", "-3"], "--synthetic_images: expected a value in [1, inf), got '-3'"),
    (["--max_text_length", "1"], "--max_text_length: expected a value in [3, inf), got '1'"),
    (["--max_train_samples", "0"], "--max_train_samples: expected a value in [1, inf), got '0'"),
    (["--max_eval_samples", "-1"], "--max_eval_samples: expected a value in [1, inf), got '-1'"),
    (["--retrieval_eval_images", "0"], "--retrieval_eval_images: expected a value in [1, inf), got '0'"),
    (["--model_name_or_path", "./outputs/cmal-smal"], "--model_name_or_path: no such folder: './outputs/cmal-smal'"),
    (["--model_name_or_path", "a/b/c"], "--model_name_or_path: no such folder: 'a/b/c' (a local path, so not a Hub repo id)"),
    (["--model_name_or_path", "tests/cmal-smal"], "--model_name_or_path: no such folder: 'tests/cmal-smal'"),
    (["--model_name_or_path", "outputs/does-not-exist"], "--model_name_or_path: no such folder: 'outputs/does-not-exist' (a local path"),
    (["--model_name_or_path", "runs/cmal"], "--model_name_or_path: no such folder: 'runs/cmal' (a local path"),
    (["--model_name_or_path", "checkpoints/step_100"], "--model_name_or_path: no such folder: 'checkpoints/step_100' (a local path"),
    (["--model_name_or_path", "README.md"], "--model_name_or_path: no such folder: 'README.md' is a file; expected a folder holding config.json"),
    (["--model_name_or_path", "someone/cmal-vqa"], "--model_name_or_path: no such folder: 'someone/cmal-vqa', and as a Hub repo id it is not in the local cache while the Hub is offline"),
    (["--model_config", "base.json"], "--model_config: expected a preset (tiny, mini, small, base) or a config JSON file"),
    (["--tokenizer", "~/no-such"], "--tokenizer: no such folder: '~/no-such'"),
    (["--anchor_mask_prob", "-1"], "--anchor_mask_prob: expected a value in [0, 1], got '-1'"),
    (["--negative_probability", "2"], "--negative_probability: expected a value in [0, 1], got '2'"),
    (["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size: expected a value in [1, inf), got '0'"),
    (["--eval_steps", "-1"], "--eval_steps: expected a value in [0, inf), got '-1'"),
]  # fmt: skip


@pytest.mark.parametrize("exists, message", [
    (True, None),
    (False, "no such folder: 'someone/cmal-vqa', and no Hub repo has that id"),
    (ConnectionError("no route"), "no such folder: 'someone/cmal-vqa', and the Hub could not be asked whether it is a repo (ConnectionError)"),
])  # fmt: skip
def test_online_one_hub_request_decides_a_repo_id(monkeypatch, exists, message):
    """Online, a repo id is asked about once (`HfApi.repo_exists`, patched at that boundary: no network here)."""
    import argparse

    from huggingface_hub import HfApi, constants

    from cmal.training.arguments import hub_model

    asked = []

    def repo_exists(self, repo_id, **kwargs):
        asked.append(repo_id)
        if isinstance(exists, Exception):
            raise exists
        return exists

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(HfApi, "repo_exists", repo_exists)
    if message is None:
        assert hub_model("someone/cmal-vqa") == "someone/cmal-vqa"
    else:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
            hub_model("someone/cmal-vqa")
    assert asked == ["someone/cmal-vqa"]


@pytest.mark.parametrize("script, argv, message", [("pretrain", argv, message) for argv, message in PRETRAIN_ARGS]
                         + [("finetune", argv, message) for argv, message in FINETUNE_ARGS])  # fmt: skip
def test_script_argument(script, argv, message, capsys, monkeypatch):
    """Refused on parsing, before any data is read, with the argument's name and the accepted values."""
    monkeypatch.chdir(os.path.dirname(os.path.dirname(__file__)))  # `tests/` exists: `tests/cmal-smal` is a path
    with pytest.raises(SystemExit) as exit_info:
        if script == "pretrain":
            pretrain.parse_args(argv)
        else:
            finetune.parse_args([*(["--task", "vqa"] if argv[0] != "--task" else []), *argv])
    assert exit_info.value.code == 2
    assert f"error: argument {message}" in capsys.readouterr().err


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def reader_cases():
    """(reader call on tmp_path, message): real formats, each broken one way."""
    vqa_questions = json.dumps({"questions": [{"question_id": 1, "image_id": 5, "question": "what?"}]})
    instances = json.dumps({"images": [{"id": 5, "width": 10, "height": 10}], "annotations": [{"id": 7, "bbox": [0, 0, 2, 2]}]})
    ref = {"ref_id": 0, "image_id": 5, "ann_id": 7, "split": "train", "sentences": [{"sent": "the dog"}]}
    return [
        (lambda d: downstream.read_vqa_v2(write(d / "q.json", '{"annotations": []}')),
         r"q.json: expected a JSON object with 'questions', got keys \['annotations'\]: is it the right file\?"),
        (lambda d: downstream.read_vqa_v2(write(d / "q.json", '{"questions": [')),
         r"q.json: not valid JSON \(Expecting value"),
        (lambda d: downstream.read_vqa_v2(write(d / "q.json", "[1, 2]")),
         r"q.json: expected a JSON object with 'questions', got a list"),
        (lambda d: downstream.read_vqa_v2(write(d / "q.json", '{"questions": [{"question_id": 1, "question": "q"}]}')),
         r"q.json, questions\[0\]: the record lacks \['image_id'\]"),
        (lambda d: downstream.read_vqa_v2(write(d / "q.json", vqa_questions), write(d / "a.json", '{"questions": []}')),
         r"a.json: expected a JSON object with 'annotations'"),
        (lambda d: downstream.read_vqa_v2(write(d / "q.json", vqa_questions), write(d / "a.json", '{"annotations": [{"question_id": 1}]}')),
         r"a.json, annotations\[0\]: the record lacks \['answers'\]"),
        (lambda d: downstream.read_snli_ve(write(d / "ve.jsonl", '{"Flickr30K_ID": 1, "sentence2": "a", "gold_label": "neutral"}\n{oops')),
         r"ve.jsonl:2: not valid JSON"),
        (lambda d: downstream.read_snli_ve(write(d / "ve.jsonl", '{"Flickr30K_ID": 1, "sentence2": "a"}')),
         r"ve.jsonl:1: the record lacks \['gold_label'\]"),
        (lambda d: downstream.read_snli_ve(write(d / "ve.jsonl", '[1]')), r"ve.jsonl:1: expected a JSON object, got list"),
        (lambda d: downstream.read_nlvr2(write(d / "dev.json", '{"sentence": "two dogs", "label": "True"}')),
         r"dev.json:1: the record lacks \['identifier'\]"),
        (lambda d: downstream.read_nlvr2(write(d / "dev.json", '{"identifier": "dev-1-0-0", "sentence": "s", "label": "maybe"}')),
         r"dev.json:1: label must be 'True' or 'False', got 'maybe'"),
        (lambda d: downstream.read_refcoco(write(d / "refs.json", '{"refs": []}'), write(d / "i.json", instances), "train"),
         r"refs.json: expected a list of refs, got a dict"),
        (lambda d: downstream.read_refcoco(write(d / "refs.json", json.dumps([{k: v for k, v in ref.items() if k != "sentences"}])),
                                           write(d / "i.json", instances), "train"),
         r"refs.json, ref 0: the record lacks \['sentences'\]"),
        (lambda d: downstream.read_refcoco(write(d / "refs.json", json.dumps([ref])), write(d / "i.json", '{"images": []}'), "train"),
         r"i.json: expected a JSON object with 'annotations'"),
        (lambda d: downstream.read_refcoco(write(d / "refs.json", json.dumps([{**ref, "ann_id": 8}])), write(d / "i.json", instances), "train"),
         r"1 refs of .*refs.json name an image or annotation that .*i.json lacks, e.g. ref_id 0's ann_id 8: are they the same dataset\?"),
        (lambda d: downstream.read_refcoco(write(d / "refs.json", json.dumps([ref])), None, "train"),
         r"RefCOCO needs the COCO `instances.json` as its annotations file"),
        (lambda d: downstream.read_karpathy(write(d / "k.json", '{"annotations": []}'), "train"),
         r"k.json: expected a JSON object with 'images'"),
        (lambda d: downstream.read_karpathy(write(d / "k.json", '{"images": [{"split": "train", "sentences": []}]}'), "train"),
         r"k.json, images\[0\]: the record lacks \['filename'\]"),
        (lambda d: downstream.read_vqa_v2(write(d / "q.json", vqa_questions), image_id_template="{filepath}/{}"),
         r"--image_id_template '\{filepath\}/\{\}' cannot format the image id 5 \(KeyError\('filepath'\)\); it takes `\{\}` for the id$"),
        (lambda d: downstream.read_vqa_v2(write(d / "q.json", vqa_questions), image_id_template="COCO_{:012d"),
         r"--image_id_template 'COCO_\{:012d' cannot format the image id 5"),
        (lambda d: downstream.read_karpathy(write(d / "k.json", '{"images": [{"filename": "a.jpg", "split": "val", "sentences": []}]}'), "train"),
         r"k.json' holds no examples for the requested split"),
        *integrity_cases(vqa_questions, instances, ref),
    ]  # fmt: skip


def integrity_cases(vqa_questions: str, instances: str, ref: dict):
    """Files that contradict themselves or carry values no dataset has: repeated ids (a lookup keeps one),
    impossible boxes and image sizes, empty texts, answers in another format."""
    question = {"question_id": 1, "image_id": 5, "question": "what?"}
    annotation = {"question_id": 1, "answers": [{"answer": "yes"}]}

    def instances_with(image=None, annotation=None):
        base = json.loads(instances)
        return json.dumps({"images": [{**base["images"][0], **(image or {})}], "annotations": [{**base["annotations"][0], **(annotation or {})}]})

    def refcoco(d, image=None, annotation=None, refs=(ref,)):
        return downstream.read_refcoco(write(d / "refs.json", json.dumps(list(refs))), write(d / "i.json", instances_with(image, annotation)), "train")

    def write_bytes(path, data: bytes) -> str:
        path.write_bytes(data)
        return str(path)

    return [
        (lambda d: downstream.read_vqa_v2(write_bytes(d / "q.json", vqa_questions.encode("utf-16"))),
         r"q.json: not UTF-8 text \(it starts with a UTF-16 byte-order mark\): byte 0 cannot be decoded; JSON files are UTF-8"),
        (lambda d: downstream.read_snli_ve(write_bytes(d / "ve.jsonl", b'{"Flickr30K_ID": 1, "sentence2": "caf\xe9", "gold_label": "neutral"}')),
         r"ve.jsonl: not UTF-8 text: byte 37 cannot be decoded"),
        (lambda d: downstream.read_vqa_v2(write(d / "q.json", json.dumps({"questions": [question, {**question, "question": "who?"}]}))),
         r"q.json, questions\[0\] and \[1\] have the same question_id 1: each must be unique"),
        (lambda d: downstream.read_vqa_v2(write(d / "q.json", vqa_questions), write(d / "a.json", json.dumps({"annotations": [annotation, annotation]}))),
         r"a.json, annotations\[0\] and \[1\] have the same question_id 1"),
        (lambda d: downstream.read_vqa_v2(write(d / "q.json", vqa_questions), write(d / "a.json", json.dumps({"annotations": [{"question_id": 1, "answers": ["yes", "no"]}]}))),
         r"a.json, annotations\[0\]: `answers` must be a list of objects with 'answer' \(VQA v2's format\), got \['yes', 'no'\]"),
        (lambda d: downstream.read_vqa_v2(write(d / "q.json", json.dumps({"questions": [{**question, "question": "   "}]}))),
         r"q.json, questions\[0\]: `question` must be a non-empty text, got '   '"),
        (lambda d: downstream.read_vqa_v2(write(d / "q.json", json.dumps({"questions": [{**question, "question": None}]}))),
         r"q.json, questions\[0\]: `question` must be a non-empty text, got None"),
        (lambda d: downstream.read_snli_ve(write(d / "ve.jsonl", '{"Flickr30K_ID": 1, "sentence2": "", "gold_label": "neutral"}')),
         r"ve.jsonl:1: `sentence2` must be a non-empty text, got ''"),
        (lambda d: downstream.read_nlvr2(write(d / "dev.json", '{"identifier": "dev-1-0-0", "sentence": " ", "label": "True"}')),
         r"dev.json:1: `sentence` must be a non-empty text, got ' '"),
        (lambda d: refcoco(d, annotation={"bbox": [0, 0, -2, 2]}),
         r"i.json, annotations\[0\] \(id 7\): `bbox` must be COCO's \[x, y, width, height\] with a positive width and height, got \[0, 0, -2, 2\]"),
        (lambda d: refcoco(d, annotation={"bbox": [0, 0, 2]}), r"i.json, annotations\[0\] \(id 7\): `bbox` must be COCO's"),
        (lambda d: refcoco(d, annotation={"bbox": [0, 0, 2, "2"]}), r"i.json, annotations\[0\] \(id 7\): `bbox` must be COCO's"),
        (lambda d: refcoco(d, image={"width": 0}), r"i.json, images\[0\] \(id 5\): `width` must be a positive number of pixels, got 0"),
        (lambda d: refcoco(d, image={"height": "10"}), r"i.json, images\[0\] \(id 5\): `height` must be a positive number of pixels, got '10'"),
        (lambda d: refcoco(d, image={"width": None}), r"i.json, images\[0\] \(id 5\): `width` must be a positive number of pixels, got None"),
        (lambda d: downstream.read_refcoco(write(d / "refs.json", json.dumps([ref])), write(d / "i.json", json.dumps(
            {"images": [{"id": 5, "width": 10, "height": 10}] * 2, "annotations": [{"id": 7, "bbox": [0, 0, 2, 2]}]})), "train"),
         r"i.json, images\[0\] and \[1\] have the same id 5"),
        (lambda d: downstream.read_refcoco(write(d / "refs.json", json.dumps([ref])), write(d / "i.json", json.dumps(
            {"images": [{"id": 5, "width": 10, "height": 10}], "annotations": [{"id": 7, "bbox": [0, 0, 2, 2]}] * 2})), "train"),
         r"i.json, annotations\[0\] and \[1\] have the same id 7"),
        (lambda d: refcoco(d, refs=[{**ref, "image_id": 6}]), r"e.g. ref_id 0's image_id 6: are they the same dataset\?"),
        (lambda d: refcoco(d, refs=[{**ref, "sentences": [{"sent": ""}]}]), r"refs.json, ref_id 0: `sent` must be a non-empty text, got ''"),
        (lambda d: downstream.read_karpathy(write(d / "k.json", json.dumps({"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": "\t"}]}]})), "train"),
         r"k.json, images\[0\]: `raw` must be a non-empty text, got '\\t'"),
        (lambda d: downstream.read_refcoco(write(d / "refs.json", json.dumps([ref])), write(d / "i.json", json.dumps(
            {"images": [{"id": 5, "width": 10}], "annotations": [{"id": 7, "bbox": [0, 0, 2, 2]}]})), "train"),
         r"i.json, images\[0\]: the record lacks \['height'\]"),
    ]  # fmt: skip


@pytest.mark.parametrize("read, message", reader_cases())
def test_reader(tmp_path, read, message):
    with pytest.raises(ValueError, match=message):
        read(tmp_path)


def test_loading_names_broken_files(tmp_path):
    CMALModel(tiny_config()).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(OSError, match=r"The weights of .* are not a complete safetensors file \(.*\): an interrupted save"):
        CMALModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config.json must hold a JSON object of config fields, got a list"):
        CMALConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": ')
    with pytest.raises(OSError, match=r"config.json.* is not a valid JSON file"):
        CMALConfig.from_pretrained(tmp_path)


def saved_then(change):
    """A tiny model saved to a folder, then `change(folder)` done to it; returns the path to load."""
    def make(folder):
        CMALModel(tiny_config()).save_pretrained(folder / "m")
        return change(folder / "m") or folder / "m"
    return make


def edit_weights(edit):
    def change(folder):
        weights = load_file(folder / "model.safetensors")
        edit(weights)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return change


def set_one(weights, name, value):
    weights[name][..., 0] = value


@pytest.mark.parametrize("make, message", [
    (saved_then(lambda f: None), None),  # an intact folder loads (the battery's control)
    (saved_then(edit_weights(lambda w: set_one(w, "pooler.dense.weight", float("nan")))),
     r"The weights of .*m' hold NaN or infinite values in 1 tensors \(pooler.dense.weight\): a diverged run saved them"),
    (saved_then(edit_weights(lambda w: set_one(w, "pooler.dense.bias", float("inf")))),
     r"hold NaN or infinite values in 1 tensors \(pooler.dense.bias\)"),
    (saved_then(edit_weights(lambda w: w.update({"pooler.dense.weight": w["pooler.dense.weight"].long()}))),
     r"model.safetensors stores float weights as I64 \(pooler.dense.weight\): not weights a run saved"),
    (saved_then(edit_weights(lambda w: w.update({"pooler.dense.bias": w["pooler.dense.bias"] > 0}))),
     r"model.safetensors stores float weights as BOOL \(pooler.dense.bias\)"),
    (saved_then(lambda f: (f / "config.json").unlink()),
     r"m' holds no config.json, so it is not a saved model \(save_pretrained writes config.json beside the weights\); "
     r"it holds \[.*'model.safetensors'.*\]"),
    (saved_then(lambda f: f / "model.safetensors"),
     r"model.safetensors' is a file; a model path must be a folder holding config.json and model.safetensors"),
    (lambda d: (d / "empty").mkdir() or d / "empty", r"empty' holds no config.json, so it is not a saved model .*; it holds \[\]"),
])  # fmt: skip
def test_loading_refuses_what_a_run_could_not_have_saved(tmp_path, make, message):
    path = make(tmp_path)
    if message is None:
        assert torch.isfinite(CMALModel.from_pretrained(path).pooler.dense.weight).all()
        return
    with pytest.raises((OSError, ValueError), match=message):
        CMALModel.from_pretrained(path)


@pytest.mark.parametrize("text, message", [
    (json.dumps({"hiden_size": 64}), r"m.json: unknown config fields 'hiden_size' \(did you mean 'hidden_size'\?\); CMALConfig's fields: .*hidden_size"),
    (json.dumps({"hidden_size": 64, "num_layers": 2, "zzz": 1}), r"unknown config fields 'num_layers' \(did you mean 'num_text_layers'\?\), 'zzz';"),
    (json.dumps([64]), r"m.json: expected a JSON object of config fields, got list"),
    ('{"hidden_size": 64', r"m.json: not a JSON file \(Expecting"),
    ("\udcff", r"m.json: not a JSON file"),
    (None, None),  # what save_pretrained writes (auto_map and all) is a --model_config that loads
])  # fmt: skip
def test_model_config_file(tmp_path, text, message):
    from cmal.training.model_setup import config_from_file

    if text is None:
        tiny_config().save_pretrained(tmp_path)
        assert config_from_file(str(tmp_path / "config.json")).hidden_size == tiny_config().hidden_size
        return
    (tmp_path / "m.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=r"^--model_config .*" + message):
        config_from_file(str(tmp_path / "m.json"))


@pytest.mark.parametrize("text, message", [
    ("", r"`text\[0\]` is blank \(''\): every text must hold at least one word"),
    ("  \n", r"`text\[0\]` is blank \('  \\n'\)"),
    (["a red ball", " "], r"`text\[1\]` is blank \(' '\)"),
])  # fmt: skip
def test_processor_refuses_a_blank_text(text, message):
    from cmal.processors import CMALProcessor
    from cmal.training.data.tokenizer import build_word_tokenizer

    processor = CMALProcessor(CMALImageProcessor(concept_names=["ball"]), build_word_tokenizer(["a red ball"]))
    regions = {"features": np.zeros((1, 4), np.float32), "boxes": np.array([[0, 0, 1, 1]], np.float32), "boxes_normalized": True, "concept_ids": [0]}
    with pytest.raises(ValueError, match=message):
        processor(text=text, regions=[regions] * (len(text) if isinstance(text, list) else 1))


@pytest.mark.parametrize("value, message", [
    (0, r"`max_image_pixels` must be a positive integer or None, got 0"),
    ("64MP", r"`max_image_pixels` must be a positive integer or None, got '64MP'"),
    (True, r"`max_image_pixels` must be a positive integer or None, got True"),
])  # fmt: skip
def test_image_processor_pixel_limit(value, message):
    with pytest.raises(ValueError, match=message):
        CMALImageProcessor(max_image_pixels=value)


@pytest.mark.parametrize("image, message", [
    (b"hello", r"`image` is not an image Pillow can read"),
    ("no-such-photo.jpg", r"`image` is a path to no file: 'no-such-photo.jpg'"),
    ("data:image/png;base64,aGVsbG8=", r"`image` is not an image Pillow can read"),
    ("data:image/png;base64,aGVsbG8", r"`image` is a `data:` URL whose base64 is invalid \(Incorrect padding\)"),
    (PIL.Image.new("RGB", (0, 0)), r"`image` is empty \(0x0 pixels\)"),
    (PIL.Image.new("L", (5, 0)), r"`image` is empty \(5x0 pixels\)"),
])  # fmt: skip
def test_open_image(image, message):
    with pytest.raises(ValueError, match=message):
        CMALImageProcessor().open_image(image)


def test_every_broken_file_is_named_as_a_path_as_bytes_and_as_a_lazily_opened_image(tmp_path):
    """The class of uploads that are not a whole image of a safe size: each one a ValueError with its reason,
    however it is handed over (a PIL image opened by the caller is still decoded lazily: a truncated file
    fails in `open_image`, not in a transform)."""
    processor = CMALImageProcessor()
    for name, (path, message) in broken_images(tmp_path).items():
        with pytest.raises(ValueError, match=r"^`image` " + message):
            processor.open_image(str(path))
        with pytest.raises(ValueError, match=r"^`photo` " + message):
            processor.open_image(path.read_bytes(), "`photo`")
        if name.startswith(("truncated", "corrupt")):
            with pytest.raises(ValueError, match=r"^`images\[0\]` " + message):
                processor(PIL.Image.open(path))


def bytes_folder(folder, data: bytes) -> str:
    folder.mkdir()
    (folder / "a.npz").write_bytes(data)
    return str(folder)


def npz_folder(folder, **arrays) -> str:
    folder.mkdir()
    np.savez(folder / "a.npz", **arrays)
    return str(folder)


@pytest.mark.parametrize("convert, message", [
    (lambda d: convert_npz(npz_folder(d / "n", features=np.zeros(5, np.float32), norm_bb=np.zeros(4), conf=np.zeros(1)), str(d / "s")),
     r"a.npz: an array has too few dimensions .*; expected \[N, D\] features and \[N, 4\] boxes"),
    (lambda d: convert_npz(npz_folder(d / "n", x=np.zeros((2, 3), np.float32), bbox=np.zeros((3, 4)), image_w=9, image_h=9), str(d / "s")),
     r"a.npz: `boxes` must have shape \[N, 4\] with N = 2 regions, got shape \[3, 4\]"),
    (lambda d: convert_npz(npz_folder(d / "n", x=np.zeros((2, 3), np.float32), bbox=np.zeros((2, 4)), image_w=0, image_h=9), str(d / "s")),
     r"a.npz: cannot normalise boxes by an image size of 0x9"),
    (lambda d: convert_npz(npz_folder(d / "n", feats=np.zeros((2, 3))), str(d / "s")), r"a.npz: unknown .npz layout with keys \['feats'\]"),
    (lambda d: convert_npz(bytes_folder(d / "n", b"garbage bytes, not a zip"), str(d / "s")), r"a.npz: not an .npz archive of arrays \("),
    (lambda d: convert_npz(bytes_folder(d / "n", b"PK\x03\x04truncated"), str(d / "s")), r"a.npz: not an .npz archive of arrays \("),
    (lambda d: convert_tsv([write(d / "f.tsv", "a\t10\t10\t1\tAAAA\tAAA=x\n")], str(d / "s")),
     r"f.tsv, line 1: `features` is not valid base64 \(.*\)"),
    (lambda d: convert_tsv([write(d / "f.tsv", "a\t10\t10\tone\tAAAA\tAAAA\n")], str(d / "s")),
     r"f.tsv, line 1: `num_boxes` must be a whole number, got 'one'"),
    (lambda d: convert_tsv([write(d / "f.tsv", "a\t10\t10\t-1\tAAAA\tAAAA\n")], str(d / "s")),
     r"f.tsv, line 1: `num_boxes` must not be negative, got -1"),
    (lambda d: convert_tsv([write(d / "f.tsv", "a\t10\t10\n")], str(d / "s")),
     r"f.tsv, line 1: 3 tab-separated fields, expected 6 \(bottom-up-attention"),
])  # fmt: skip
def test_converter(tmp_path, convert, message):
    with pytest.raises(ValueError, match=message):
        convert(tmp_path)
