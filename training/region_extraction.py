"""Regions from pixels: a detector (a CMAL checkpoint's, or a transformers detector wrapped as one) over images,
written to a region store; the synthetic world's images through a detector; and the run of
`training/extract_regions.py`, whose command line stays there (light: its `--help` answers without torch).
"""

import hashlib
import json
import logging
import os

import PIL.Image
import torch
from tqdm.auto import tqdm

from cmal.modeling_cmal import CMALConfig, CMALModel
from cmal.processors.image_processing_cmal import CMALImageProcessor
from cmal.training.data.region_store import RegionStoreWriter
from cmal.training.runtime import configure_logging


logger = logging.getLogger("cmal.training.extract_regions")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def list_images(image_dir: str) -> list[tuple[str, str]]:
    """(image id, path) of every image below `image_dir`, sorted; the id is the relative path without extension."""
    found = []
    for root, _, files in os.walk(image_dir):
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                path = os.path.join(root, name)
                image_id = os.path.splitext(os.path.relpath(path, image_dir))[0].replace(os.sep, "/")
                found.append((image_id, path))
    found.sort()
    clashes = [(a, b) for (id_a, a), (id_b, b) in zip(found, found[1:]) if id_a == id_b]
    if clashes:
        raise ValueError(f"{len(clashes)} image ids name two files each, e.g. {clashes[0][0]!r} and {clashes[0][1]!r}: "
                         "an image's id is its path without the extension, so rename one of each pair")  # fmt: skip
    return found


def upright_size(image: PIL.Image.Image) -> tuple[int, int]:
    """(width, height) once the EXIF orientation is applied, read from the tag instead of rotating pixels."""
    width, height = image.size
    return (height, width) if image.getexif().get(0x0112) in (5, 6, 7, 8) else (width, height)


def open_image(path: str) -> PIL.Image.Image:
    image = PIL.Image.open(path)
    image.load()
    return image


def detector_model(path: str, num_regions: int, score_threshold: float) -> tuple[CMALModel, CMALImageProcessor]:
    """A CMAL model whose raw-image path is the transformers detector in `path` (its encoder, a `tiny` one, never
    runs here), and a CMAL image processor with that detector's own preprocessing."""
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    detector = AutoModelForObjectDetection.from_pretrained(path)
    config = CMALConfig.from_detector(detector.config, preset="tiny", detector_num_regions=num_regions,
                                      detector_score_threshold=score_threshold)  # fmt: skip
    model = CMALModel(config)
    model.load_detector_weights(detector)
    processor = CMALImageProcessor.from_detector_processor(
        AutoImageProcessor.from_pretrained(path), concept_names=config.concept_names, max_regions=config.max_regions
    )
    return model, processor


def extract_world(world_dir: str, model: CMALModel, image_processor: CMALImageProcessor) -> str:
    """The synthetic world's images (`synthetic.write_images`) through `model`'s detector, once: a region store
    kept in the world's folder under a key of what decides the regions (the detector's weights, its limits, the
    pixels it gets), so a rerun, or the fine-tuning of a model pre-trained on it, reuses it, and a killed
    extraction resumes. Returns the store's path."""
    from cmal.training.data import synthetic

    config = model.config
    settings = [config.detector_num_regions, config.detector_score_threshold, image_processor.size,
                image_processor.do_rescale, image_processor.rescale_factor, image_processor.do_normalize]  # fmt: skip
    digest = hashlib.sha256(json.dumps(settings).encode())
    for name, tensor in sorted(model.detector.model.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    key = digest.hexdigest()[:16]
    store = os.path.join(world_dir, f"detected-{key}")
    # named by its key, not a path: the same detector moved elsewhere (or inside a checkpoint) reuses the store
    extract(model, image_processor, synthetic.write_images(world_dir), store, batch_size=50, detector_name=f"sha256 {key}")
    return store


@torch.no_grad()
def extract(
    model: CMALModel,
    image_processor: CMALImageProcessor,
    image_dir: str,
    output_dir: str,
    batch_size: int = 8,
    shard_size: int = 256,
    detector_name: str | None = None,
) -> int:
    """Extract regions of every image not yet in the store; returns how many were added."""
    images = list_images(image_dir)
    if not images:
        raise ValueError(f"`image_dir` {image_dir!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    config = model.config
    detector = {
        "name_or_path": detector_name,
        "model_type": config.detector_config["model_type"],
        "num_regions": config.detector_num_regions,
        "score_threshold": config.detector_score_threshold,
    }
    model.eval()
    added = 0
    with RegionStoreWriter(
        output_dir, feature_dim=config.visual_feat_dim, concept_names=config.concept_names,
        source="detector", detector=detector, shard_size=shard_size,
    ) as writer:  # fmt: skip
        todo = [(image_id, path) for image_id, path in images if image_id not in writer.done_image_ids]
        logger.info(f"{len(images)} images, {len(images) - len(todo)} already stored, {len(todo)} to extract")
        progress = tqdm(total=len(images), initial=len(images) - len(todo), desc="extracting regions", unit="img")
        for start in range(0, len(todo), batch_size):
            batch, opened = todo[start : start + batch_size], []
            for image_id, path in batch:
                try:
                    opened.append((image_id, open_image(path)))
                except (OSError, PIL.Image.DecompressionBombError) as error:
                    logger.warning(f"skipping unreadable image {path}: {error}")
            if not opened:
                progress.update(len(batch))
                continue
            pixels = image_processor(images=[image for _, image in opened])["pixel_values"]
            regions = model.detect_regions(pixels.to(model.device))
            for i, (image_id, image) in enumerate(opened):
                keep = regions["visual_attention_mask"][i].bool()
                width, height = upright_size(image)
                writer.add(
                    {
                        "image_id": image_id,
                        "image_width": width,
                        "image_height": height,
                        "features": regions["visual_feats"][i][keep].float().cpu().numpy(),
                        "boxes": regions["visual_pos"][i][keep][:, :4].float().cpu().numpy(),
                        "concept_ids": regions["region_concept_ids"][i][keep].cpu().numpy(),
                        "scores": regions["region_scores"][i][keep].float().cpu().numpy(),
                    }
                )
                added += 1
            progress.update(len(batch))
        progress.close()
    return added


def run(args) -> None:
    """Extract with the parsed `args` of `extract_regions.parse_args`."""
    configure_logging()

    if args.detector:
        num_regions = 36 if args.num_regions is None else args.num_regions
        model, image_processor = detector_model(args.detector, num_regions, args.score_threshold or 0.0)
    else:
        model = CMALModel.from_pretrained(args.model_name_or_path)
        if model.detector is None:
            raise SystemExit(f"{args.model_name_or_path} has no detector (config.detector_config is None)")
        image_processor = CMALImageProcessor.from_pretrained(args.model_name_or_path)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    added = extract(
        model.to(device), image_processor, args.image_dir, args.output_dir, args.batch_size, args.shard_size,
        detector_name=args.detector or args.model_name_or_path,
    )  # fmt: skip
    print(f"added {added} images to {args.output_dir}")
