"""Run a CMAL checkpoint's detector over an image folder and write a region feature store.

    python training/extract_regions.py --model_name_or_path CKPT --image_dir DIR --output_dir OUT
    python training/extract_regions.py --detector outputs/detector-synthetic --image_dir DIR --output_dir OUT

The checkpoint must carry a detector (`CMALConfig.from_detector`) and its image processor; `--detector`
takes a transformers detector folder instead (e.g. training/train_detector.py's), wrapped the way a
checkpoint built on it carries it (`detector_model`). The
regions come from `CMALModel.detect_regions`, the very function the model runs on `pixel_values`,
so a model trained on this store answers the same on the raw image. The store is written in shards,
each atomically; re-running the same command after an interruption skips the images already stored.
Schema and other routes into it: docs/DATA.md.
"""

import argparse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model_name_or_path", help="CMAL checkpoint (folder or Hub id) with a detector.")
    source.add_argument("--detector", help="A transformers object-detection folder (e.g. training/train_detector.py's).")
    parser.add_argument("--num_regions", type=int, default=None, help="With --detector: regions kept per image, best first (36).")
    parser.add_argument("--score_threshold", type=float, default=None,
                        help="With --detector: kept regions scoring below it are dropped (0.0).")  # fmt: skip
    parser.add_argument("--image_dir", required=True, help="Folder of images (searched recursively).")
    parser.add_argument("--output_dir", required=True, help="Region store to create or resume.")
    parser.add_argument("--batch_size", type=int, default=8, help="Images per detector call.")
    parser.add_argument("--shard_size", type=int, default=256, help="Images per store shard (the unit of resume).")
    parser.add_argument("--device", default=None, help="Where the detector runs (default: cuda if available, else cpu).")
    args = parser.parse_args(argv)
    if not args.detector and (args.num_regions is not None or args.score_threshold is not None):
        parser.error("--num_regions and --score_threshold go with --detector; a checkpoint's config sets its own")
    return args


def main(argv=None):
    """Parse, then extract (`region_extraction.run`): `--help` and usage errors answer before torch loads."""
    args = parse_args(argv)
    from cmal.training.region_extraction import run

    run(args)


if __name__ == "__main__":
    main()
