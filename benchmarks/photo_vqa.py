"""VQA from pixels next to VQA from stored regions: a checkpoint that carries a detector, on the world's questions.

    python training/train_detector.py                                                      # outputs/detector-synthetic
    accelerate launch --config_file training/configs/one_process.yaml training/pretrain.py --detector outputs/detector-synthetic \
        --output_dir outputs/cmal-mini-detector
    python training/finetune.py --task vqa --model_name_or_path outputs/cmal-mini-detector --output_dir outputs/vqa-synthetic-detector
    python benchmarks/photo_vqa.py outputs/vqa-synthetic-detector
    python benchmarks/photo_vqa.py outputs/vqa-synthetic-detector --image_side 104   # a smaller detector input

Each validation question of the synthetic world is answered twice by the same model: from the rendered image
(the processor's pixels through the checkpoint's own detector) and from that image's row of the detected
region store fine-tuning read (`region_extraction.extract_world`, float16 features). Prints accuracy (the world's
answers are unanimous, so VQA accuracy is exact match) per question type and overall, next to chance and two
ceilings: the ruler's oracle (`floors.RegionReader` reading the world's stored regions, docs/BENCHMARKS.md §2.1)
and the same oracle reading the detector's own regions (what the detections allow: a colour the detector's
features do not carry caps it), then one JSON line with every figure and how often the two answers agree.
"""

import argparse
import json

import numpy as np
import PIL.Image
import torch

from cmal.modeling_cmal import CMALForQuestionAnswering
from cmal.processors import CMALProcessor
from cmal.training.data import synthetic
from cmal.training.data.region_store import load_region_store, row_to_regions
from cmal.training.region_extraction import extract_world

import floors  # benchmarks/floors.py, beside this script


@torch.no_grad()
def evaluate(folder: str, synthetic_images: int = 2000, seed: int = 0, split: str = "validation",
             max_questions: int | None = None, batch_size: int = 32, image_side: int | None = None) -> dict:  # fmt: skip
    """`image_side`: the detector reads the pixels at this side instead of the processor's (the stored regions were
    made at the processor's): what a smaller, faster detector input costs in accuracy."""
    model = CMALForQuestionAnswering.from_pretrained(folder).eval()
    processor = CMALProcessor.from_pretrained(folder)
    world_dir = synthetic.default_world(num_images=synthetic_images, seed=seed)
    store, _ = load_region_store(extract_world(world_dir, model.cmal, processor.image_processor))  # fine-tuning's store
    rows = store.with_format("numpy")
    row_of = {image_id: k for k, image_id in enumerate(store["image_id"])}
    questions = synthetic.load_world(world_dir)["vqa"][split]
    if max_questions is not None:
        questions = questions.select(range(min(max_questions, len(questions))))
    if image_side is not None:  # after the store is made: it stays the full-size detections fine-tuning read
        processor.image_processor.size = {"height": image_side, "width": image_side}
    answers = {"pixels": [], "regions": []}
    for start in range(0, len(questions), batch_size):
        batch = questions[start : start + batch_size]
        text = dict(text=batch["question"], return_tensors="pt")
        images = [PIL.Image.open(f"{world_dir}/images/{image_id}.png") for image_id in batch["image_id"]]
        regions = [row_to_regions(rows[row_of[image_id]]) for image_id in batch["image_id"]]
        for source, inputs in (("pixels", processor(images=images, **text)), ("regions", processor(regions=regions, **text))):
            answers[source] += [model.config.id2label[int(k)] for k in model(**inputs).logits.argmax(-1)]
    world = synthetic.load_world(world_dir)
    if list(store["image_id"]) != list(world["regions"]["image_id"]):
        raise ValueError(f"the detected store of {world_dir} does not hold the world's images in the world's order")
    for name, regions in (("oracle", world["regions"]), ("oracle_on_detections", store)):
        answers[name] = oracle_answers({**world, "regions": regions}, questions)
    truth = [given[0] for given in questions["answers"]]
    types = questions["question_type"]

    def accuracy(given, kind=None):
        return None if given is None else float(np.mean([a == t for a, t, k in zip(given, truth, types) if kind in (None, k)]))

    return {
        "questions": len(truth),
        "image_side": processor.image_processor.size["height"],
        **{f"accuracy_from_{source}": accuracy(given) for source, given in answers.items() if source in ("pixels", "regions")},
        "agreement": float(np.mean([a == b for a, b in zip(answers["pixels"], answers["regions"])])),
        **{name: accuracy(answers[name]) for name in ("oracle", "oracle_on_detections")},
        "per_type": {kind: {"questions": types.count(kind), "chance": 1 / len(synthetic.QUESTION_OPTIONS[kind]),
                            **{source: accuracy(given, kind) for source, given in answers.items()}}
                     for kind in synthetic.QUESTION_OPTIONS if kind in types},
    }  # fmt: skip


def oracle_answers(world: dict, questions) -> list | None:
    """The ruler's oracle (`floors.RegionReader` with its `TrainedReader`) reading `world["regions"]`; None when no
    confident region overlaps an object (a detector that finds nothing: no reading can be learnt)."""
    if next(floors.labelled_regions(world, synthetic.world_scenes(world)), None) is None:
        return None
    reader = floors.RegionReader(world, floors.TrainedReader(world))
    return [reader.vqa(item) for item in questions]


def markdown(result: dict) -> str:
    """The per-type table: chance, the model from pixels and from the stored detections, the two oracles."""
    rows = ["| question type | questions | chance | from pixels | from stored detections | oracle, detections | oracle, world's regions |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    def cell(value):
        return "—" if value is None else f"{value:.3f}"

    for kind, row in result["per_type"].items():
        rows.append(f"| {kind} | {row['questions']} | {row['chance']:.3f} | " + " | ".join(
            cell(row[source]) for source in ("pixels", "regions", "oracle_on_detections", "oracle")) + " |")  # fmt: skip
    rows.append(f"| all | {result['questions']} | | " + " | ".join(cell(result[key]) for key in (
        "accuracy_from_pixels", "accuracy_from_regions", "oracle_on_detections", "oracle")) + " |")  # fmt: skip
    return "\n".join(rows)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="A fine-tuned VQA folder that carries a detector.")
    p.add_argument("--synthetic_images", type=int, default=2000)
    p.add_argument("--synthetic_seed", type=int, default=0)
    p.add_argument("--split", default="validation", choices=["validation", "test"])
    p.add_argument("--max_questions", type=int, default=None)
    p.add_argument("--image_side", type=int, default=None, help="Detector input side for the pixels (default: the processor's).")
    args = p.parse_args(argv)
    result = evaluate(args.model, args.synthetic_images, args.synthetic_seed, args.split, args.max_questions,
                      image_side=args.image_side)  # fmt: skip
    print(markdown(result))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
