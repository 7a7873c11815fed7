"""What a checkpoint's regions still say about their objects: shape, colour and size read back by linear probes.

    python benchmarks/region_probe.py outputs/cmal-mini-synthetic          # a pre-trained folder
    python benchmarks/region_probe.py --random                             # a model of the same size, untrained

REC names an object by its shape and tells it apart from others of that shape by colour, size or place; the
detector's tag names only the shape. Anchor swaps put the feature of the word naming a region's tag in the
region's slot, and associative mapping predicts the tag: a pre-training that leans on tags may leave the region
encoder carrying the shape and little else. Each confident region of the world that overlaps an object
(`floors.labelled_regions`) is read three ways: as every model is fed it (`input`: the stored features and the box),
by the uni-modal region encoder (`regions`: `CMALModel(...).region_features`) and at its slot of the unified
encoder's output (`unified`, with the image's first caption as text and no anchor swap, as fine-tuning reads it).
A logistic regression per attribute is fit on the training images' regions and scored on the validation
images'; chance is the validation share of the most frequent value.
"""

import argparse

import floors  # benchmarks/floors.py, beside this script
import numpy as np
import torch

from cmal.training.data import synthetic
from cmal.training.data.files import write_json


ATTRIBUTES = ("shape", "colour", "size")
READINGS = ("input", "regions", "unified")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="A pre-trained CMAL folder (pretrain.py's output).")
    p.add_argument("--random", action="store_true", help="Probe a randomly initialised `--model_config` model instead.")
    p.add_argument("--model_config", default="mini", help="With --random: the preset or config JSON.")
    p.add_argument("--synthetic_images", type=int, default=2000)
    p.add_argument("--max_train_images", type=int, default=400, help="Training images whose regions fit the probes.")
    p.add_argument("--output", help="Also write the results as JSON here.")
    args = p.parse_args(argv)
    if (args.model is None) == (not args.random):
        p.error("give a model folder or --random (not both)")
    return args


def random_model(world: dict, model_config: str, seed: int = 0):
    """A model (and processor) of `model_config`'s size as finetune.py builds one from scratch for the world."""
    from cmal.training.data.tokenizer import build_word_tokenizer
    from cmal.training.tasks import synthetic_texts
    from cmal.training.model_setup import new_model_config, new_processor

    from cmal.modeling_cmal import CMALModel

    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(synthetic_texts(world), model_max_length=40)
    config = new_model_config(model_config, tokenizer, world["region_metadata"])
    return CMALModel(config), new_processor(config, tokenizer, synthetic.synthetic_lexicon())


@torch.no_grad()
def readings(world: dict, model, processor, rows: list[int], batch_size: int = 64) -> dict[str, dict[tuple, np.ndarray]]:
    """{reading: {(store row, region index): vector}} for every region of the store rows `rows`."""
    model.eval()
    caption = {}
    for split in synthetic.SPLIT_NAMES:
        for image_id, text in zip(world["captions"][split]["image_id"], world["captions"][split]["text"]):
            caption.setdefault(image_id, text)
    store = world["regions"].select_columns(["image_id", "features", "boxes", "concept_ids", "scores"]).with_format("numpy")
    out = {reading: {} for reading in READINGS}
    for start in range(0, len(rows), batch_size):
        batch = [store[row] for row in rows[start : start + batch_size]]
        regions = [{"features": image["features"], "boxes": image["boxes"], "boxes_normalized": True,
                    "concept_ids": image["concept_ids"], "scores": image["scores"]} for image in batch]  # fmt: skip
        inputs = processor(text=[caption[image["image_id"]] for image in batch], regions=regions)
        outputs = model(**inputs)
        text_len = inputs["input_ids"].shape[1]
        for b, row in enumerate(rows[start : start + batch_size]):
            for k in range(len(batch[b]["scores"])):
                out["input"][row, k] = np.concatenate([batch[b]["features"][k], inputs["visual_pos"][b, k]]).astype(np.float32)
                out["regions"][row, k] = outputs.region_features[b, k].float().numpy()
                out["unified"][row, k] = outputs.last_hidden_state[b, text_len + k].float().numpy()
    return out


def probe(world: dict, model, processor, max_train_images: int = 400) -> dict[str, dict[str, float]]:
    """{reading: {attribute: validation accuracy}} and {"chance": {attribute: majority share}}."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    split_of = {image_id: split for split in synthetic.SPLIT_NAMES for image_id in world["captions"][split]["image_id"]}
    image_ids = world["regions"]["image_id"][:]
    labelled = {"train": [], "validation": []}
    for row, k, _, obj in floors.labelled_regions(world, synthetic.world_scenes(world)):
        split = split_of.get(image_ids[row])
        if split in labelled:
            labelled[split].append((row, k, obj))
    train_rows = sorted({row for row, _, _ in labelled["train"]})[:max_train_images]
    labelled["train"] = [item for item in labelled["train"] if item[0] in set(train_rows)]
    rows = sorted({row for items in labelled.values() for row, _, _ in items})
    vectors = readings(world, model, processor, rows)
    result = {"chance": {}}
    for attribute in ATTRIBUTES:
        values = [getattr(obj, attribute) for _, _, obj in labelled["validation"]]
        result["chance"][attribute] = max(values.count(v) for v in set(values)) / len(values)
    for reading in READINGS:
        result[reading] = {}
        x = {split: np.stack([vectors[reading][row, k] for row, k, _ in items]) for split, items in labelled.items()}
        for attribute in ATTRIBUTES:
            y = {split: [getattr(obj, attribute) for _, _, obj in items] for split, items in labelled.items()}
            fitted = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x["train"], y["train"])
            result[reading][attribute] = float((fitted.predict(x["validation"]) == np.asarray(y["validation"])).mean())
    return result


def markdown(result: dict) -> str:
    lines = ["| reading | " + " | ".join(ATTRIBUTES) + " |", "|---|" + "---|" * len(ATTRIBUTES)]
    for reading in ("chance", *READINGS):
        lines.append(f"| {reading} | " + " | ".join(f"{result[reading][a]:.3f}" for a in ATTRIBUTES) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    world = synthetic.load_world(synthetic.default_world(num_images=args.synthetic_images))
    if args.random:
        model, processor = random_model(world, args.model_config)
    else:
        from cmal.modeling_cmal import CMALModel
        from cmal.processors import CMALProcessor

        model, processor = CMALModel.from_pretrained(args.model, anchor_mask_prob=0.0), CMALProcessor.from_pretrained(args.model)
    result = probe(world, model, processor, args.max_train_images)
    print(markdown(result))
    if args.output:
        write_json(args.output, result)
    return result


if __name__ == "__main__":
    main()
