"""What `training/pretrain.py` runs once its arguments are parsed: the corpus, the data pipeline, the model,
held-out validation and the training run. The command line stays in `pretrain.py`, which imports this module
only after parsing, so its `--help` answers without loading torch.
"""

import json
import logging
import os
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from cmal.model_cards import render as model_card
from cmal.modeling_cmal import CMALConfig, CMALForPreTraining
from cmal.modeling_cmal.convert_bert_to_cmal import load_bert_weights
from cmal.training.arguments import AMC_PARTS, TrainingRun
from cmal.training.data.pretraining import ImageTextPairs, LengthGroupedSampler, PretrainingCollator, StreamingPairs, encode_captions
from cmal.training.data.region_store import load_region_store
from cmal.training.data.tokenizer import build_word_tokenizer
from cmal.training.hub import push_to_hub
from cmal.training.loop import train
from cmal.training.metrics import binary_auc, load_metric
from cmal.training.model_setup import apply_compute_flags, new_model_config, new_processor
from cmal.training.region_extraction import detector_model, extract_world
from cmal.training.run_folder import resume_hint_on_interrupt, save_final
from cmal.training.runtime import finish, loader_options, prepare_training, setup_accelerator
from cmal.training.tasks import synthetic_texts


logger = logging.getLogger("cmal.training.pretrain")
LOSSES = ["mlm_loss", "mrm_feature_loss", "mrm_concept_loss", "itm_loss", "amc_token_loss", "amc_region_loss",
          "amc_pointer_loss", "itc_loss", "loss"]  # fmt: skip


class Corpus(NamedTuple):
    """What pre-training reads. `true_of(text, image_row)` says whether a caption also holds of another image,
    where the corpus knows (None otherwise); it keeps such pairs out of the ITM negatives. `twins(image_row)`
    lists an image's contrast twins, ITM's hard negatives, where the corpus has them (None otherwise)."""

    captions: Any  # a DatasetDict with train/validation splits, or a Dataset (training only)
    regions: Any  # the region store's Dataset
    metadata: dict
    lexicon: Any  # the anchor lexicon, or None (then built from the tags and vocabulary)
    vocabulary_texts: list
    true_of: Callable | None
    twins: Callable | None = None


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
        return Corpus(world["captions"], regions, metadata, synthetic.synthetic_lexicon(), texts, synthetic.caption_truth(world),
                      synthetic.twin_rows(regions["image_id"][:]))  # fmt: skip
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


def build_data(args, corpus: Corpus, num_processes: int = 1, process_index: int = 0, first_process_first=nullcontext):
    """(config, processor, pairs, collator, dataloader) of a `load_corpus` result: the pipeline `main`
    trains on, and the one `benchmarks/speed.py` times. `first_process_first` (the accelerator's
    `main_process_first`) wraps the captions' encoding: one process writes the cached table, the others load it."""
    captions, regions, metadata, lexicon, vocabulary_texts, true_of, twins = corpus
    train_texts = corpus_subset(split(captions, "train"), args.corpus_fraction)
    tokenizer = build_tokenizer(args, vocabulary_texts)
    config = build_config(args, tokenizer, metadata)
    processor = new_processor(config, tokenizer, lexicon, args.detector)
    tokens = None
    if args.pretokenize:
        with first_process_first():
            tokens = encode_captions(train_texts, processor, args.max_text_length, args.num_workers or None)
    train_set = ImageTextPairs(train_texts, regions, tokens)
    collator = PretrainingCollator(
        processor, train_set, args.mlm_probability, args.mrm_probability, args.itm_negative_probability,
        max_length=args.max_text_length, seed=args.seed, true_of=true_of, negative_window=args.itm_negative_window,
        twins=twins, twin_probability=args.itm_twin_probability, twins_from_epoch=twins_from_epoch(args),
        features_in_main=True,  # the loop gathers them (`ImageTextPairs.finish_batch`): workers never touch a feature
    )  # fmt: skip
    if args.streaming:
        stream = StreamingPairs(train_set, args.per_device_train_batch_size, args.streaming_shards, process_index,
                                num_processes, args.num_workers, args.seed)  # fmt: skip
        # its own generator, as below: an iterator's worker seeds must not come from (and shift) the global RNG
        loader = DataLoader(stream, batch_size=None, collate_fn=collator, generator=torch.Generator().manual_seed(args.seed),
                            **loader_options(args.num_workers))  # fmt: skip
        return config, processor, train_set, collator, loader
    global_batch = args.per_device_train_batch_size * num_processes
    sampler = LengthGroupedSampler(train_set.lengths(), global_batch, seed=args.seed,
                                   easy=train_set.easy_pairs(), easy_epochs=args.curriculum_epochs)  # fmt: skip
    train_dataloader = DataLoader(
        train_set, batch_size=args.per_device_train_batch_size, sampler=sampler, collate_fn=collator,
        generator=torch.Generator().manual_seed(args.seed), **loader_options(args.num_workers),
    )  # fmt: skip
    return config, processor, train_set, collator, train_dataloader


def twins_from_epoch(args) -> int:
    return args.curriculum_epochs if args.itm_twins_from_epoch is None else args.itm_twins_from_epoch


def validation_pairs(corpus) -> ImageTextPairs | None:
    """The validation captions joined to their images; None when the corpus has no validation split."""
    captions, regions = corpus.captions, corpus.regions
    texts = split(captions, "validation")
    return ImageTextPairs(texts, regions) if texts is not None and len(texts) else None


def validation_loader(args, pairs, processor, accelerator, negative_probability: float, corpus=None):
    """A prepared DataLoader over `pairs`, each caption with its image or, with `negative_probability`,
    a negative (`MatchingPairs`): a contrast twin wherever the corpus has one, so held-out ITM measures what
    rules on region count and tags cannot tell (training may mix in other images: `--itm_twin_probability`);
    negatives and masks are fixed (seed, epoch 0)."""
    collator = PretrainingCollator(processor, pairs, args.mlm_probability, args.mrm_probability, negative_probability,
                                   max_length=args.max_text_length, seed=args.seed + 1, true_of=corpus and corpus.true_of,
                                   twins=corpus and corpus.twins, twin_probability=1.0)  # fmt: skip
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
    apply_compute_flags(model, args.gradient_checkpointing, args.padding_free)
    return model


def write_model_card(folder, args, config, results):
    """README.md from this run's config, arguments and losses (templates and checks: model_cards/)."""
    training_args = vars(args)
    model_card.write_model_card(folder, "pretraining", config, training_args, results, None,
                                base_model=model_card.hub_repo_id(args.init_text_from),
                                dataset_name=model_card.dataset_name(training_args))  # fmt: skip


WORLD_ITM_RULES_AUC = 0.67  # the best rule on count, tags and colour against the world's twins (benchmarks/floors.py)


def run(args):
    """Pre-train with the parsed `args` of `pretrain.parse_args`; returns the training results."""
    # heads whose weight is 0 get no gradient; DDP must be told
    unused = min(args.mlm, args.mrm, args.itm, args.amc) == 0 or len(set(args.amc_parts)) < len(AMC_PARTS)
    training = TrainingRun.from_args(args)
    accelerator = setup_accelerator(training, find_unused_parameters=unused)

    with resume_hint_on_interrupt(training, accelerator):
        with accelerator.main_process_first():
            corpus = load_corpus(args)
        config, processor, train_set, collator, train_dataloader = build_data(args, corpus, accelerator.num_processes, accelerator.process_index,
                                                                              accelerator.main_process_first)  # fmt: skip
        model = build_model(args, config)
        model, optimizer, train_dataloader, scheduler, max_steps = prepare_training(accelerator, training, model, train_dataloader, "cmal_pretrain")
        results = train(accelerator, training, model, optimizer, scheduler, train_dataloader, max_steps, LOSSES, "pre-training")
        held_out, pairs = {}, validation_pairs(corpus) if args.itm > 0 or args.itc > 0 else None
        if pairs is not None and args.itm > 0:
            held_out |= validate_matching(model, validation_loader(args, pairs, processor, accelerator, 0.5, corpus), accelerator)
        if pairs is not None and args.itc > 0:
            held_out |= validate_retrieval(model, validation_loader(args, pairs, processor, accelerator, 0.0), pairs, accelerator)
        if held_out:
            results["validation"] = held_out

        state_dict = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            with save_final(accelerator, model, state_dict, processor, training, results) as folder:
                write_model_card(folder, args, accelerator.unwrap_model(model).config, results)
            logger.info(f"data loading took {100 * results['data_loading_share']:.1f}% of the training time")
            print(f"final losses: {json.dumps({k: round(v, 4) for k, v in results['final_losses'].items()})}")
            if "itm_auc" in held_out:
                print(f"validation ITM: accuracy {held_out['itm_accuracy']:.4f}, AUC {held_out['itm_auc']:.4f} "
                      f"({held_out['itm_pairs']} pairs, half mismatched: chance 0.5)")
                if args.dataset == "synthetic" and held_out["itm_auc"] < WORLD_ITM_RULES_AUC:
                    print(f"warning: held-out ITM AUC {held_out['itm_auc']:.3f} is below the {WORLD_ITM_RULES_AUC} that rules "
                          "on region count, tags and colour reach on these pairs: this encoder does not tell a caption's "
                          "image from its contrast twin. No setting of this package reaches that yet (the defaults: 0.53; "
                          "docs/BENCHMARKS.md §2)")  # fmt: skip
            if "itc_images" in held_out:
                print(f"validation retrieval by ITC: text->image R@1 {held_out['itc_text_to_image_r1']:.1f}%, "
                      f"R@5 {held_out['itc_text_to_image_r5']:.1f}% over {held_out['itc_images']} images "
                      f"(chance R@1 {100 / held_out['itc_images']:.1f}%)")
            print(f"model saved to {os.path.abspath(args.output_dir)} ({results['train_seconds']:.0f} s of training)")
            if args.push_to_hub:
                push_to_hub(args.output_dir, args.hub_model_id, private=args.hub_private_repo or None)
    finish(accelerator)
    return results
