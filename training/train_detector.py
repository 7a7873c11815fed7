"""Train a small RT-DETR on the synthetic world's rendered scenes: the detector its raw-image path needs.

    python training/train_detector.py                             # about 4 minutes on 2 CPU cores
    python training/train_detector.py --max_train_steps 300 --output_dir /tmp/detector

The world's stored regions are computed from pixels around jittered boxes (training/data/synthetic.py); a
photo needs a detector. This one is trained from scratch: RT-DETR (transformers) with a ResNet of one basic
block per stage, 64-d queries and 2 decoder layers, 0.76 M parameters, at the world's 128 x 128 resolution.
Beside each object's shape and box it learns its colour and size, as bottom-up attention's attribute head did:
a linear head reads them off the decoder state of every query matched to an object, so that state, which is
the region feature a CMAL checkpoint reads, carries them. It trains on scenes drawn from the world's generator
with seeds no world image uses (a fresh batch every step) and is evaluated with pycocotools' COCO mAP on the
rendered images of the world's validation split and their ground-truth boxes, and by the attribute head's
accuracy. The output folder loads with `AutoModelForObjectDetection` and `AutoImageProcessor` (whose
preprocessing is the training's: 128 x 128, pixels / 255, no normalisation) and holds `eval_results.json`.
A run that ends below the targets (mAP@0.5 0.9, colour 0.9) says so. It trains through the shared loop
(`training/loop.py`): checkpoints, `--resume_from_checkpoint latest` and the output folder's policy are the
other scripts'.
"""

import argparse

from cmal.training.arguments import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    add_training_args,
    check_training_args,
    command_line,
    script_entry,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic_images", type=POSITIVE_INT, default=2000, help="Images of the world evaluated on.")
    p.add_argument("--synthetic_seed", type=NON_NEGATIVE_INT, default=0, help="Seed of the world.")
    p.add_argument("--attribute_loss_weight", type=NON_NEGATIVE, default=1.0,
                   help="Weight of the attribute head's loss (colour and size of each matched query; 0: shapes only).")
    add_training_args(p, "outputs/detector-synthetic", batch_size=16, learning_rate=1e-3, epochs=1, warmup=0, cmal_model=False)
    # RT-DETR's own clipping and decay, a constant rate; each step draws fresh scenes, so steps, not epochs
    p.set_defaults(max_train_steps=1500, weight_decay=1e-4, max_grad_norm=0.1, lr_scheduler_type="constant", logging_steps=100)
    args = p.parse_args(argv)
    args.command = command_line("training/train_detector.py", argv)
    check_training_args(p, args)
    return args


def main(argv=None) -> dict:
    """Parse, then run (`train_detector_run.py`): `--help` and usage errors answer before torch loads."""
    args = parse_args(argv)
    from cmal.training.train_detector_run import TARGET_COLOUR_ACCURACY, TARGET_MAP_50, run

    results = run(args)
    validation, defaults = results["validation"], parse_args([])
    if validation["map_50"] < TARGET_MAP_50 or validation["colour_accuracy"] < TARGET_COLOUR_ACCURACY:
        print(f"warning: below this detector's targets (mAP@0.5 {TARGET_MAP_50}, colour {TARGET_COLOUR_ACCURACY}), which "
              f"the defaults reach (--max_train_steps {defaults.max_train_steps}, batch "
              f"{defaults.per_device_train_batch_size}): a model built on these regions reads only the objects and "
              "colours this detector finds")  # fmt: skip
    return results


if __name__ == "__main__":
    script_entry(main)
