"""Pre-train CMAL with Accelerate (the `*_no_trainer.py` pattern of transformers' examples).

    accelerate launch training/pretrain.py                       # small CMAL on the synthetic world
    accelerate launch --multi_gpu --num_processes 2 training/pretrain.py --per_device_train_batch_size 16
    accelerate launch --config_file training/configs/fsdp.yaml training/pretrain.py --model_config base ...

With no arguments it pre-trains the `mini` preset on the embedded synthetic scene world (generated
once and cached) and leaves a Hub-ready folder in `--output_dir`: weights, config, code, processor,
model card. Objectives: MLM, MRM, ITM, AMC (token, region, pointer parts) and optionally ITC, each
weighted by its flag (0 switches it off) and logged on its own.

Checkpoints (`--checkpointing_steps`) are written to `output_dir/checkpoints/step_N` atomically;
`--resume_from_checkpoint latest` continues mid-epoch with the same data order and random state, so
a killed run ends with the weights an uninterrupted run would have had (the loop: `training/loop.py`).
"""

import argparse
import os

from cmal.training.arguments import (
    AMC_PARTS,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    PRESET_NAMES,
    PROBABILITY,
    add_training_args,
    bounded,
    check_training_args,
    command_line,
    existing_folder,
    lazy_main,
    model_config_source,
    model_source,
    script_entry,
)


def dataset_source(text: str) -> str:
    if text == "synthetic" or all(os.path.isdir(os.path.join(text, part)) for part in ("regions", "captions")):
        return text
    raise argparse.ArgumentTypeError(f"expected 'synthetic' or a folder with regions/ and captions/ (docs/DATA.md), got {text!r}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default="synthetic", type=dataset_source,
                      help="'synthetic' (the embedded scene world) or a folder with `regions/` (a region store, "
                           "docs/DATA.md) and `captions/` (a datasets table or DatasetDict with image_id, text).")
    data.add_argument("--synthetic_images", type=POSITIVE_INT, default=2000, help="Images of the synthetic world.")
    data.add_argument("--synthetic_seed", type=NON_NEGATIVE_INT, default=0, help="Seed of the synthetic world.")
    data.add_argument("--max_text_length", type=bounded(int, 3), default=40, help="Word pieces per text, [CLS]/[SEP] included.")
    data.add_argument("--corpus_fraction", type=bounded(float, 0, 1, low_open=True), default=1.0,
                      help="Pre-train on the texts of the first fraction of the training images (data-scale studies).")
    data.add_argument("--curriculum_epochs", type=NON_NEGATIVE_INT, default=6,
                      help="Epochs drawn only from the pairs whose image has at most the median number of regions "
                           "(small scenes first: ITM learns on them and carries over); 0 for none.")
    data.add_argument("--pretokenize", action="store_true",
                      help="Encode every caption once before training (tokenizer and anchor lexicon, cached by `datasets` "
                           "beside the captions' files), so each epoch's batches only pad them: a fifth of the "
                           "loader's CPU (docs/BENCHMARKS.md §3). A first run pays 45-65 us a caption (one core).")
    data.add_argument("--streaming", action="store_true",
                      help="Read the captions as shards in order, each process and worker its own (StreamingPairs), "
                           "instead of length-grouped batches drawn at random; needs --curriculum_epochs 0.")
    data.add_argument("--streaming_shards", type=POSITIVE_INT, default=64,
                      help="Shards of the stream: at least processes x workers, ideally many times that.")
    data.add_argument("--detector", default=None, type=existing_folder,
                      help="A transformers detector folder (training/train_detector.py's) carried in the model, so it "
                           "answers from pixels; with --dataset synthetic the world's regions are its detections.")
    data.add_argument("--detector_num_regions", type=POSITIVE_INT, default=10, help="With --detector: regions per image.")
    data.add_argument("--detector_score_threshold", type=PROBABILITY, default=0.3,
                      help="With --detector: detections scoring below it are dropped (0.3: 97.6%% of the world's "
                           "objects kept, 4.4 regions per image).")
    data.add_argument("--tokenizer", default=None, type=model_source,
                      help="Tokenizer folder or Hub id (a fast BERT-style one). Default: with --init_text_from, "
                           "that checkpoint's; otherwise a word-level vocabulary built from the corpus.")
    model = p.add_argument_group("model")
    model.add_argument("--model_config", default="mini", type=model_config_source, help=f"Preset ({', '.join(PRESET_NAMES)}) or a config JSON.")
    model.add_argument("--init_text_from", default=None, type=model_source, help="BERT checkpoint (folder or Hub id) for the text path.")
    for name, default, what in [("mlm", 1.0, "masked language modelling"), ("mrm", 1.0, "masked region modelling"),
                                ("itm", 1.0, "image-text matching"), ("amc", 1.0, "associative mapping (all 3 parts)"),
                                ("itc", 0.0, "image-text contrastive (the CMCL baseline)")]:  # fmt: skip
        model.add_argument(f"--{name}", type=NON_NEGATIVE, default=default, help=f"Weight of {what}; 0 switches it off.")
    model.add_argument("--amc_parts", nargs="+", choices=AMC_PARTS, default=list(AMC_PARTS),
                       help="AMC parts that get the --amc weight (ablations); the others are off.")
    model.add_argument("--anchor_mask_prob", type=PROBABILITY, default=None,
                       help="Probability that an anchor concept is swapped in training (default: the config's, 0.3).")
    model.add_argument("--no_hypersphere", action="store_true", help="Keep plain uni-modal features (an ablation).")
    model.add_argument("--no_hard_negatives", action="store_true",
                       help="ITM on the collator's random negatives only, none drawn by ITC similarity (an ablation).")
    model.add_argument("--anchor_fill", choices=["swap", "mask"], default="swap",
                       help="Fill chosen anchors with the partner modality's feature (swap) or nothing (mask, an ablation).")
    model.add_argument("--mlm_probability", type=PROBABILITY, default=0.15, help="Share of non-anchor words masked.")
    model.add_argument("--mrm_probability", type=PROBABILITY, default=0.15, help="Share of regions masked.")
    model.add_argument("--itm_negative_probability", type=PROBABILITY, default=0.5, help="Share of mismatched pairs.")
    model.add_argument("--itm_twin_probability", type=PROBABILITY, default=1.0,
                       help="Share of mismatched pairs whose image is a contrast twin of the caption's (same region "
                            "count and tags, another colour, size, place or shape count), where the corpus has "
                            "twins (the synthetic world); the rest are other images.")
    model.add_argument("--itm_twins_from_epoch", type=NON_NEGATIVE_INT, default=None,
                       help="First epoch whose negatives may be contrast twins (default: the first after the "
                            "curriculum, --curriculum_epochs).")
    model.add_argument("--itm_negative_window", type=NON_NEGATIVE_INT, default=0,
                       help="A mismatched pair's image is one of the N images nearest its own in region count, so "
                            "length-grouped batches stay unpadded with adaptive region counts (e.g. 1000; 0: any "
                            "image). It also takes away region count as an ITM cue (see docs/BENCHMARKS.md).")
    # 12 epochs of the 2,000-image world are 1,500 steps: ITM needs about a thousand to leave chance (measured)
    add_training_args(p, "outputs/cmal-mini-synthetic", batch_size=32, learning_rate=1e-3, epochs=12, warmup=50)
    args = p.parse_args(argv)
    if args.streaming and args.curriculum_epochs:
        p.error("argument --streaming: reads shards in order and draws no curriculum: pass --curriculum_epochs 0")
    check_training_args(p, args)
    args.command = command_line("training/pretrain.py", argv)
    return args


main = lazy_main(parse_args, "cmal.training.pretrain_run")


if __name__ == "__main__":
    script_entry(main)
