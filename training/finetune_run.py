"""What `training/finetune.py` runs once its arguments are parsed: the task's data, the model and processor,
training, evaluation and the saved folder. The command line stays in `finetune.py`, which imports this module
only after parsing, so its `--help` answers without loading torch.
"""

import importlib.resources
import logging
import os

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from cmal.model_cards import render as model_card
from cmal.modeling_cmal import CMALConfig, CMALModel
from cmal.processors import CMALImageProcessor, CMALProcessor
from cmal.training.data.downstream import TaskCollator, TaskExamples
from cmal.training.data.region_store import load_region_store
from cmal.training.data.tokenizer import build_word_tokenizer
from cmal.training.arguments import TrainingRun
from cmal.training.data.files import write_json
from cmal.training.hub import push_to_hub
from cmal.training.loop import train
from cmal.training.model_setup import apply_compute_flags, new_model_config, new_processor
from cmal.training.region_extraction import extract_world
from cmal.training.run_folder import resume_hint_on_interrupt, save_final
from cmal.training.runtime import finish, loader_options, prepare_training, setup_accelerator
from cmal.training.tasks import TASKS, synthetic_texts


logger = logging.getLogger("cmal.training.finetune")


def load_data(args, task):
    """(train table, validation table or None, test table or None (`--synthetic_test`: the world's test split),
    regions, region metadata, vocabulary texts, lexicon or None)."""
    if args.train_file is None:
        from cmal.training.data import synthetic

        world_dir = synthetic.default_world(num_images=args.synthetic_images, seed=args.synthetic_seed)
        world = synthetic.load_world(world_dir)
        table = task.synthetic_data(world)
        regions, metadata = world["regions"], world["region_metadata"]
        if args.model_name_or_path and CMALConfig.from_pretrained(args.model_name_or_path).detector_config:
            # a model carrying a detector (pretrain.py --detector) reads the world as that detector sees it
            model = CMALModel.from_pretrained(args.model_name_or_path)
            image_processor = CMALImageProcessor.from_pretrained(args.model_name_or_path)
            regions, metadata = load_region_store(extract_world(world_dir, model, image_processor))
        test = table["test"] if args.synthetic_test else None
        return _non_empty(task, table["train"], table["validation"]) + (
            test, regions, metadata, synthetic_texts(world), synthetic.synthetic_lexicon())  # fmt: skip
    train = task.read(args.train_file, args.train_annotations, args.train_split, args.image_id_template)
    validation = None
    if args.validation_file or task.split_by_name:
        validation = task.read(
            args.validation_file or args.train_file,
            args.validation_annotations or (args.train_annotations if task.split_by_name else None),
            args.validation_split, args.validation_image_id_template or args.image_id_template,
        )  # fmt: skip
    regions, metadata = load_region_store(args.regions, require_concept_names=True)
    return _non_empty(task, train, validation) + (None, regions, metadata, train[task.text_column], None)


def _non_empty(task, train, validation) -> tuple:
    """(train, validation), or a clear error when a split has no example (a tiny world, a wrong split name)."""
    for name, table in (("training", train), ("validation", validation)):
        if table is not None and len(table) == 0:
            raise ValueError(f"the {name} split of {task.name.upper()} has no examples: nothing to train on or score "
                             "(give more --synthetic_images, or check the file and --*_split)")  # fmt: skip
    return train, validation


def label_maps(args, task, train) -> dict:
    """id2label/label2id of the head (VQA: the answer vocabulary of the training split); none for REC."""
    names = task.label_names(train, args.min_answer_count or (1 if args.train_file is None else 9))
    if not names:
        return {}
    return {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}}


def build_model_and_processor(args, task, labels, metadata, vocabulary_texts, lexicon):
    overrides = dict(labels)
    if args.anchor_mask_prob is not None:
        overrides["anchor_mask_prob"] = args.anchor_mask_prob
    if args.model_name_or_path:
        processor = CMALProcessor.from_pretrained(args.model_name_or_path)
        config = CMALConfig.from_pretrained(args.model_name_or_path, **overrides)
        if config.visual_feat_dim != metadata["feature_dim"] or list(config.concept_names) != list(metadata["concept_names"]):
            raise ValueError(
                f"{args.model_name_or_path!r} reads {config.visual_feat_dim}-d regions with concepts "
                f"{list(config.concept_names)[:5]}..., but the region store has {metadata['feature_dim']}-d features "
                f"and concepts {list(metadata['concept_names'])[:5]}...: extract the regions with the same detector"
            )
        # A different task's head (or another answer vocabulary) is replaced; the encoder must match exactly.
        model = task.head.from_pretrained(args.model_name_or_path, config=config, ignore_mismatched_sizes=True)
    else:
        tokenizer = (AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer
                     else build_word_tokenizer(vocabulary_texts, model_max_length=args.max_text_length))  # fmt: skip
        config = new_model_config(args.model_config, tokenizer, metadata, **overrides)
        processor = new_processor(config, tokenizer, lexicon)
        model = task.head(config)
    apply_compute_flags(model, args.gradient_checkpointing, args.padding_free)
    return model, processor


def confidence_floor(regions, train_table) -> float | None:
    """`config.region_confidence_floor`: the 5th percentile of the best region score of the training images, so
    that 1 in 20 images like them falls below it; an image whose best region scores lower is unlike them."""
    ids = set(train_table["image_id"]) if "image_id" in train_table.column_names else None
    rows = regions.select_columns(["image_id", "scores"])
    best = [max(scores) for image_id, scores in zip(rows["image_id"], rows["scores"]) if len(scores) and (ids is None or image_id in ids)]
    return float(np.percentile(best, 5)) if best else None


def evaluate(model, dataloader, accelerator, task, references, id2label, items=False, groups=None) -> dict:
    """Run the model over the evaluation set (every process a shard), gather, and compute the task metric
    (with `items`, each item's score too: `item_scores`; with `groups`, each item's group such as a VQA
    question type, the main metric per group as `<main metric>/<group>`)."""
    model.eval()
    predictions, losses = [], []
    for batch in tqdm(dataloader, disable=not accelerator.is_local_main_process, desc="evaluating", leave=False):
        with torch.no_grad():
            outputs = model(**batch)
        prediction = task.predict(outputs)
        predictions.append(accelerator.gather_for_metrics(prediction))
        losses.append(accelerator.gather_for_metrics(outputs.loss.detach().float().repeat(len(prediction))))
    model.train()
    predictions = torch.cat(predictions).cpu()
    result = {"eval_loss": torch.cat(losses).mean().item(), **task.score(predictions, references, id2label),
              "eval_samples": len(predictions)}  # fmt: skip
    if items or groups is not None:
        scores = task.item_scores(predictions, references, id2label)
    if items:
        result["item_scores"] = scores
    if groups is not None:
        for group in sorted(set(groups)):
            picked = [score for score, g in zip(scores, groups) if g == group]
            result[f"{task.main_metric}/{group}"] = sum(picked) / len(picked)
    return result


def write_model_card(folder, args, config, results, metrics):
    """README.md from this run's config, arguments and validation metrics (templates and checks: model_cards/)."""
    training_args = vars(args)
    model_card.write_model_card(folder, args.task, config, training_args, results, metrics or None,
                                base_model=model_card.hub_repo_id(args.model_name_or_path),
                                dataset_name=model_card.dataset_name(training_args))  # fmt: skip


def ship_endpoint_handler(folder: str) -> None:
    """Put the Inference Endpoint handler (`cmal.endpoint`) at the root of a checkpoint that reads raw
    images, as Endpoints expect it, so its Hub repo deploys as is."""
    endpoint = importlib.resources.files("cmal.endpoint")
    for name in ("handler.py", "requirements.txt"):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(endpoint.joinpath(name).read_bytes())


def run(args):
    """Fine-tune and evaluate with the parsed `args` of `finetune.parse_args`; returns results and metrics."""
    task = TASKS[args.task]
    training = TrainingRun.from_args(args)
    accelerator = setup_accelerator(training)

    with resume_hint_on_interrupt(training, accelerator):
        with accelerator.main_process_first():
            train_table, eval_table, test_table, regions, metadata, vocabulary_texts, lexicon = load_data(args, task)
        if args.max_train_samples:
            train_table = train_table.select(range(min(args.max_train_samples, len(train_table))))
        if eval_table is not None and args.max_eval_samples:
            eval_table = eval_table.select(range(min(args.max_eval_samples, len(eval_table))))
        labels = label_maps(args, task, train_table)
        model, processor = build_model_and_processor(args, task, labels, metadata, vocabulary_texts, lexicon)
        model.config.region_confidence_floor = confidence_floor(regions, train_table)
        id2label = model.config.id2label
        logger.info(f"{task.name} from {args.model_name_or_path or 'scratch'}")

        train_set = TaskExamples(task, train_table, regions)
        collator = TaskCollator(processor, task, train_set, labels.get("label2id"), args.max_text_length,
                                negative_probability=args.negative_probability if task.negatives else 0.0, seed=args.seed)  # fmt: skip
        train_dataloader = DataLoader(train_set, batch_size=args.per_device_train_batch_size, shuffle=True, collate_fn=collator,
                                      generator=torch.Generator().manual_seed(args.seed), **loader_options(args.num_workers))  # fmt: skip
        model, optimizer, train_dataloader, scheduler, max_steps = prepare_training(
            accelerator, training, model, train_dataloader, f"cmal_{task.name}"
        )

        def scorer(table, items=False):
            """Scores the model on `table` when called: its loader is built once, here."""
            eval_set, references = task.evaluation_set(TaskExamples(task, table, regions), args.retrieval_eval_images)
            eval_collator = TaskCollator(processor, task, eval_set, labels.get("label2id"), args.max_text_length)
            loader = accelerator.prepare(DataLoader(eval_set, batch_size=args.per_device_eval_batch_size,
                                                    collate_fn=eval_collator, **loader_options(args.num_workers)))  # fmt: skip
            grouped = task.group_column in table.column_names and len(references) == len(table)
            groups = table[task.group_column] if grouped else None
            return lambda: evaluate(model, loader, accelerator, task, references, id2label, items, groups)

        scored = None if eval_table is None else scorer(eval_table)
        results = train(accelerator, training, model, optimizer, scheduler, train_dataloader, max_steps,
                        description=f"fine-tuning {task.name}", evaluate=scored, eval_steps=args.eval_steps)  # fmt: skip

        metrics = {k: v for k, v in results["learning_curve"][-1].items() if k != "step"} if scored is not None else {}
        test = None if test_table is None else scorer(test_table, items=True)()
        accelerator.wait_for_everyone()
        state_dict = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            config = accelerator.unwrap_model(model).config
            with save_final(accelerator, model, state_dict, processor, training, results) as folder:
                if metrics:
                    write_json(os.path.join(folder, "eval_results.json"), {"task": task.name, **metrics})
                write_model_card(folder, args, config, results, metrics)
                if task.endpoint_handler and config.detector_config is not None:
                    ship_endpoint_handler(folder)
                if test:
                    write_json(os.path.join(folder, "test_results.json"), {"task": task.name, **test})
            for split, scores in (("validation", metrics), ("test", test)):
                if scores:
                    print(f"{task.name} {split}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float)))
            print(f"model saved to {os.path.abspath(args.output_dir)} ({results['train_seconds']:.0f} s of training)")
            if args.push_to_hub:
                push_to_hub(args.output_dir, args.hub_model_id, private=args.hub_private_repo or None)
    finish(accelerator)
    return {**results, "eval": metrics} | ({"test": test} if test else {})
