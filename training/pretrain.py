"""Pre-train CMAL with Accelerate (the `*_no_trainer.py` pattern of transformers' examples).

    accelerate launch training/pretrain.py                       # small CMAL on the synthetic world
    accelerate launch --multi_gpu --num_processes 2 training/pretrain.py --per_device_train_batch_size 16
    accelerate launch --config_file training/configs/fsdp.yaml training/pretrain.py --model_config base ...

With no arguments it pre-trains the `small` preset on the embedded synthetic scene world (generated
once and cached) and leaves a Hub-ready folder in `--output_dir`: weights, config, code, processor,
model card. Objectives: MLM, MRM, ITM, AMC (token, region, pointer parts) and optionally ITC, each
weighted by its flag (0 switches it off) and logged on its own.

Checkpoints (`--checkpointing_steps`) are written to `output_dir/checkpoints/step_N` atomically;
`--resume_from_checkpoint latest` continues mid-epoch with the same data order and random state, so
a killed run ends with the weights an uninterrupted run would have had (the loop: `training/loop.py`).
"""

import argparse
import json
import logging
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from cmal.model_cards import render as model_card
from cmal.modeling_cmal import CMAL_PRESETS, CMALConfig, CMALForPreTraining
from cmal.modeling_cmal.convert_bert_to_cmal import load_bert_weights
from cmal.training.data.pretraining import ImageTextPairs, LengthGroupedSampler, PretrainingCollator, StreamingPairs
from cmal.training.data.region_store import load_region_store
from cmal.training.data.tokenizer import build_word_tokenizer
from cmal.training.extract_regions import detector_model, extract_world
from cmal.training.loop import train
from cmal.training.metrics import binary_auc, load_metric
from cmal.training.tasks import synthetic_texts
from cmal.training.utils import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    PROBABILITY,
    add_training_args,
    apply_compute_flags,
    bounded,
    command_line,
    existing_folder,
    finish,
    loader_options,
    model_config_source,
    model_source,
    new_model_config,
    new_processor,
    prepare_training,
    push_to_hub,
    resume_hint_on_interrupt,
    save_final,
    setup_accelerator,
)


logger = logging.getLogger("pretrain")
LOSSES = ["mlm_loss", "mrm_feature_loss", "mrm_concept_loss", "itm_loss", "amc_token_loss", "amc_region_loss",
          "amc_pointer_loss", "itc_loss", "loss"]  # fmt: skip
AMC_PARTS = ("token", "region", "pointer")


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
    model.add_argument("--model_config", default="mini", type=model_config_source, help=f"Preset ({', '.join(CMAL_PRESETS)}) or a config JSON.")
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
    model.add_argument("--itm_negative_window", type=NON_NEGATIVE_INT, default=0,
                       help="A mismatched pair's image is one of the N images nearest its own in region count, so "
                            "length-grouped batches stay unpadded with adaptive region counts (e.g. 1000; 0: any "
                            "image). It also takes away region count as an ITM cue (see docs/BENCHMARKS.md).")
    # 12 epochs of the 2,000-image world are 1,500 steps: ITM needs about a thousand to leave chance (measured)
    add_training_args(p, "outputs/cmal-mini-synthetic", batch_size=32, learning_rate=1e-3, epochs=12, warmup=50)
    args = p.parse_args(argv)
    if args.streaming and args.curriculum_epochs:
        p.error("argument --streaming: reads shards in order and draws no curriculum: pass --curriculum_epochs 0")
    args.command = command_line("training/pretrain.py", argv)
    return args


class Corpus(NamedTuple):
    """What pre-training reads. `true_of(text, image_row)` says whether a caption also holds of another image,
    where the corpus knows (None otherwise); it keeps such pairs out of the held-out ITM negatives."""

    captions: Any  # a DatasetDict with train/validation splits, or a Dataset (training only)
    regions: Any  # the region store's Dataset
    metadata: dict
    lexicon: Any  # the anchor lexicon, or None (then built from the tags and vocabulary)
    vocabulary_texts: list
    true_of: Callable | None


def load_corpus(args) -> Corpus:
    """The corpus of `--dataset`: the synthetic world or a `convert_features.py` folder.

    The vocabulary texts build the word-level tokenizer when no BERT one is given: for the synthetic
    world they are every training text of every task, as a real vocabulary covers the words of the
    downstream questions too.
    """
    if args.dataset == "synthetic":
        from cmal.training.data import synthetic

        world_dir = synthetic.default_world(num_images=args.synthetic_images, seed=args.synthetic_seed)
        world = synthetic.load_world(world_dir)
        regions, metadata = world["regions"], world["region_metadata"]
        if args.detector:  # the same images, seen by the detector the model will carry
            model, image_processor = detector_model(args.detector, args.detector_num_regions, args.detector_score_threshold)
            regions, metadata = load_region_store(extract_world(world_dir, model, image_processor))
        texts = synthetic_texts(world)
        return Corpus(world["captions"], regions, metadata, synthetic.synthetic_lexicon(), texts, synthetic.caption_truth(world))
    from datasets import load_from_disk

    regions, metadata = load_region_store(os.path.join(args.dataset, "regions"), require_concept_names=True)
    captions = load_from_disk(os.path.join(args.dataset, "captions"))
    return Corpus(captions, regions, metadata, None, split(captions, "train")["text"], None)


def split(table, name):
    """A split of a DatasetDict, or the whole table for a plain Dataset (training only)."""
    if hasattr(table, "keys"):
        return table[name] if name in table else None
    return table if name == "train" else None


def corpus_subset(texts, fraction: float):
    """The texts of the first `fraction` of the images, in order of first appearance: less data, same kind."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--corpus_fraction must lie in (0, 1], got {fraction}")
    if fraction == 1:
        return texts
    images = list(dict.fromkeys(texts["image_id"]))
    kept = set(images[: max(1, round(fraction * len(images)))])
    return texts.select([i for i, image_id in enumerate(texts["image_id"]) if image_id in kept])


def build_tokenizer(args, texts):
    if args.tokenizer or args.init_text_from:
        return AutoTokenizer.from_pretrained(args.tokenizer or args.init_text_from)
    return build_word_tokenizer(texts, model_max_length=args.max_text_length)


def build_config(args, tokenizer, metadata) -> CMALConfig:
    """The preset or JSON config, fitted to the tokenizer and the region store, with the run's overrides."""
    overrides = dict(  # the objective weights, then ablations and the detector
        mlm_weight=args.mlm, mrm_weight=args.mrm, itm_weight=args.itm, itc_weight=args.itc,
        **{f"amc_{part}_weight": args.amc if part in args.amc_parts else 0.0 for part in AMC_PARTS},
    )  # fmt: skip
    if args.anchor_mask_prob is not None:
        overrides["anchor_mask_prob"] = args.anchor_mask_prob
    if args.detector:
        from transformers import AutoConfig

        detector = CMALConfig.from_detector(AutoConfig.from_pretrained(args.detector))
        if (detector.visual_feat_dim, detector.concept_names) != (metadata["feature_dim"], list(metadata["concept_names"])):
            raise ValueError(f"--detector {args.detector} gives {detector.visual_feat_dim}-d regions of {detector.concept_names[:5]}..., "
                             f"but the region store has {metadata['feature_dim']}-d ones of {list(metadata['concept_names'])[:5]}...: "
                             "extract the store with this detector (training/extract_regions.py --detector)")  # fmt: skip
        overrides |= dict(detector_config=detector.detector_config, detector_num_regions=args.detector_num_regions,
                          detector_score_threshold=args.detector_score_threshold)  # fmt: skip
    return new_model_config(args.model_config, tokenizer, metadata, hypersphere=not args.no_hypersphere,
                            itm_hard_negatives=not args.no_hard_negatives, anchor_fill=args.anchor_fill, **overrides)  # fmt: skip


def build_data(args, corpus: Corpus, num_processes: int = 1, process_index: int = 0):
    """(config, processor, pairs, collator, dataloader) of a `load_corpus` result: the pipeline `main`
    trains on, and the one `benchmarks/speed.py` times."""
    captions, regions, metadata, lexicon, vocabulary_texts, true_of = corpus
    train_texts = corpus_subset(split(captions, "train"), args.corpus_fraction)
    tokenizer = build_tokenizer(args, vocabulary_texts)
    config = build_config(args, tokenizer, metadata)
    processor = new_processor(config, tokenizer, lexicon, args.detector)
    train_set = ImageTextPairs(train_texts, regions)
    collator = PretrainingCollator(
        processor, train_set, args.mlm_probability, args.mrm_probability, args.itm_negative_probability,
        max_length=args.max_text_length, seed=args.seed, true_of=true_of, negative_window=args.itm_negative_window,
    )  # fmt: skip
    if args.streaming:
        stream = StreamingPairs(train_set, args.per_device_train_batch_size, args.streaming_shards, process_index,
                                num_processes, args.num_workers, args.seed)  # fmt: skip
        # its own generator, as below: an iterator's worker seeds must not come from (and shift) the global RNG
        loader = DataLoader(stream, batch_size=None, collate_fn=collator, generator=torch.Generator().manual_seed(args.seed),
                            **loader_options(args))  # fmt: skip
        return config, processor, train_set, collator, loader
    global_batch = args.per_device_train_batch_size * num_processes
    sampler = LengthGroupedSampler(train_set.lengths(), global_batch, seed=args.seed,
                                   easy=train_set.easy_pairs(), easy_epochs=args.curriculum_epochs)  # fmt: skip
    train_dataloader = DataLoader(
        train_set, batch_size=args.per_device_train_batch_size, sampler=sampler, collate_fn=collator,
        generator=torch.Generator().manual_seed(args.seed), **loader_options(args),
    )  # fmt: skip
    return config, processor, train_set, collator, train_dataloader


def validation_pairs(corpus) -> ImageTextPairs | None:
    """The validation captions joined to their images; None when the corpus has no validation split."""
    captions, regions = corpus.captions, corpus.regions
    texts = split(captions, "validation")
    return ImageTextPairs(texts, regions) if texts is not None and len(texts) else None


def validation_loader(args, pairs, processor, accelerator, negative_probability: float, true_of=None):
    """A prepared DataLoader over `pairs`, each caption with its image or, with `negative_probability`,
    another one (of which the caption is not true, where `true_of` knows); negatives and masks are fixed
    (seed, epoch 0)."""
    collator = PretrainingCollator(processor, pairs, args.mlm_probability, args.mrm_probability, negative_probability,
                                   max_length=args.max_text_length, seed=args.seed + 1, true_of=true_of)  # fmt: skip
    return accelerator.prepare(DataLoader(pairs, batch_size=args.per_device_train_batch_size, collate_fn=collator))


def validate_matching(model, dataloader, accelerator) -> dict:
    """Held-out ITM accuracy and AUC (the clean pass's match probability) and each loss's mean."""
    model.eval()
    probabilities, labels, losses = [], [], {}
    for batch in dataloader:
        with torch.no_grad():
            outputs = model(**batch)
        probabilities.append(accelerator.gather_for_metrics(outputs.itm_logits.float().softmax(-1)[:, 1]))
        labels.append(accelerator.gather_for_metrics(batch["itm_labels"]))
        for name in LOSSES:
            if outputs.get(name) is not None:
                losses.setdefault(name, []).append(accelerator.reduce(outputs[name].detach().float(), "mean").item())
    model.train()
    probabilities, labels = torch.cat(probabilities).cpu(), torch.cat(labels).cpu()
    return {
        "itm_accuracy": ((probabilities > 0.5).long() == labels).float().mean().item(),
        "itm_auc": binary_auc(probabilities.numpy(), labels.numpy()),
        "itm_pairs": len(labels),
        "losses": {name: sum(values) / len(values) for name, values in losses.items()},
    }


def validate_retrieval(model, dataloader, pairs, accelerator) -> dict:
    """Held-out retrieval by ITC alone: every validation caption against every validation image, ranked by the
    cosine of their projected uni-modal vectors; recall in percent (chance R@1: 100 / images)."""
    model.eval()
    texts, images = [], []
    for batch in dataloader:
        with torch.no_grad():
            outputs = model(**batch)
        texts.append(accelerator.gather_for_metrics(outputs.text_embeds.float()))
        images.append(accelerator.gather_for_metrics(outputs.image_embeds.float()))
    model.train()
    texts, images = torch.cat(texts).cpu(), torch.cat(images).cpu()
    rows = pairs.image_rows[: len(texts)]
    columns = list(dict.fromkeys(rows))  # each image once, in order of first caption
    first = {row: i for i, row in reversed(list(enumerate(rows)))}
    scores = texts @ images[[first[row] for row in columns]].T
    column_of = {row: j for j, row in enumerate(columns)}
    recall = load_metric("retrieval_recall").compute(
        predictions=scores.tolist(), references=[column_of[row] for row in rows], ks=(1, 5)
    )
    return {f"itc_{name}": value for name, value in recall.items()} | {"itc_images": len(columns)}


def build_model(args, config):
    model = CMALForPreTraining(config)
    if args.detector:
        from transformers import AutoModelForObjectDetection

        model.load_detector_weights(AutoModelForObjectDetection.from_pretrained(args.detector))
    if args.init_text_from:
        logger.info("\n" + str(load_bert_weights(model, args.init_text_from)))
    apply_compute_flags(model, args)
    return model


def write_model_card(folder, args, config, results):
    """README.md from this run's config, arguments and losses (templates and checks: model_cards/)."""
    training_args = vars(args)
    model_card.write_model_card(folder, "pretraining", config, training_args, results, None,
                                base_model=model_card.hub_repo_id(args.init_text_from),
                                dataset_name=model_card.dataset_name(training_args))  # fmt: skip


def main(argv=None):
    args = parse_args(argv)
    # heads whose weight is 0 get no gradient; DDP must be told
    unused = min(args.mlm, args.mrm, args.itm, args.amc) == 0 or len(set(args.amc_parts)) < len(AMC_PARTS)
    accelerator = setup_accelerator(args, find_unused_parameters=unused)

    with resume_hint_on_interrupt(args, accelerator):
        with accelerator.main_process_first():
            corpus = load_corpus(args)
        config, processor, train_set, collator, train_dataloader = build_data(args, corpus, accelerator.num_processes, accelerator.process_index)
        model = build_model(args, config)
        model, optimizer, train_dataloader, scheduler, max_steps = prepare_training(accelerator, args, model, train_dataloader, "cmal_pretrain")
        results = train(accelerator, args, model, optimizer, scheduler, train_dataloader, collator, max_steps, LOSSES, "pre-training")
        held_out, pairs = {}, validation_pairs(corpus) if args.itm > 0 or args.itc > 0 else None
        if pairs is not None and args.itm > 0:
            held_out |= validate_matching(model, validation_loader(args, pairs, processor, accelerator, 0.5, corpus.true_of), accelerator)
        if pairs is not None and args.itc > 0:
            held_out |= validate_retrieval(model, validation_loader(args, pairs, processor, accelerator, 0.0), pairs, accelerator)
        if held_out:
            results["validation"] = held_out

        state_dict = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            with save_final(accelerator, model, state_dict, processor, args, results) as folder:
                write_model_card(folder, args, accelerator.unwrap_model(model).config, results)
            logger.info(f"data loading took {100 * results['data_loading_share']:.1f}% of the training time")
            print(f"final losses: {json.dumps({k: round(v, 4) for k, v in results['final_losses'].items()})}")
            if "itm_auc" in held_out:
                print(f"validation ITM: accuracy {held_out['itm_accuracy']:.4f}, AUC {held_out['itm_auc']:.4f} "
                      f"({held_out['itm_pairs']} pairs, half mismatched: chance 0.5)")
            if "itc_images" in held_out:
                print(f"validation retrieval by ITC: text->image R@1 {held_out['itc_text_to_image_r1']:.1f}%, "
                      f"R@5 {held_out['itc_text_to_image_r5']:.1f}% over {held_out['itc_images']} images "
                      f"(chance R@1 {100 / held_out['itc_images']:.1f}%)")
            print(f"model saved to {os.path.abspath(args.output_dir)} ({results['train_seconds']:.0f} s of training)")
            if args.push_to_hub:
                push_to_hub(args.output_dir, args.hub_model_id, private=args.hub_private_repo or None)
    finish(accelerator)
    return results


if __name__ == "__main__":
    main()
