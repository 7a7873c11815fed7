"""VQA from pixels next to VQA from stored regions: a checkpoint that carries a detector, on the world's questions.

    python training/train_detector.py                                                      # outputs/detector-synthetic
    accelerate launch --config_file training/configs/one_process.yaml training/pretrain.py --detector outputs/detector-synthetic \
        --output_dir outputs/cmal-mini-detector
    python training/finetune.py --task vqa --model_name_or_path outputs/cmal-mini-detector --output_dir outputs/vqa-synthetic-detector
    python benchmarks/photo_vqa.py outputs/vqa-synthetic-detector
    python benchmarks/photo_vqa.py outputs/vqa-synthetic-detector --image_side 104   # a smaller detector input

Each validation question of the synthetic world is answered twice by the same model: from the rendered image
(the processor's pixels through the checkpoint's own detector) and from that image's row of the detected
region store fine-tuning read (`region_extraction.extract_world`, float16 features). Prints one JSON line:
accuracy (the world's answers are unanimous, so VQA accuracy is exact match) and how often the two answers agree.
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
    truth = [given[0] for given in questions["answers"]]
    return {
        "questions": len(truth),
        "image_side": processor.image_processor.size["height"],
        **{f"accuracy_from_{source}": float(np.mean([a == t for a, t in zip(given, truth)])) for source, given in answers.items()},
        "agreement": float(np.mean([a == b for a, b in zip(answers["pixels"], answers["regions"])])),
    }


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
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
