"""Fine-tune CMAL on a downstream task with Accelerate and evaluate it.

    accelerate launch training/finetune.py --task vqa --model_name_or_path outputs/cmal-mini-synthetic
    accelerate launch training/finetune.py --task rec                      # from scratch, synthetic world
    accelerate launch training/finetune.py --task vqa --model_name_or_path <pre-trained> --regions <store> \\
        --train_file v2_OpenEnded_mscoco_train2014_questions.json --train_annotations v2_mscoco_train2014_annotations.json \\
        --validation_file ..._val2014_questions.json --validation_annotations ..._val2014_annotations.json \\
        --image_id_template "COCO_train2014_{:012d}"

Tasks and heads: vqa (CMALForQuestionAnswering, VQA soft accuracy), ve (CMALForImageTextClassification,
accuracy), nlvr2 (CMALForVisualReasoning, accuracy), rec (CMALForReferringExpression, accuracy at
IoU >= 0.5), retrieval (CMALForImageTextRetrieval, recall@1/5/10 both ways over a candidate grid).

Without --train_file the task comes from the embedded synthetic world (the one `pretrain.py` uses).
With it, the files are read in their original formats (training/data/downstream.py) and joined to
the region store given by --regions. The output folder holds the model, processor, model card,
`train_results.json` and `eval_results.json`. Checkpoints and resuming work as in `pretrain.py`. What
differs per task (head, reader, columns, labels, metric) is the task's record in `training/tasks.py`.
"""

import argparse

from cmal.training.arguments import (
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    PRESET_NAMES,
    PROBABILITY,
    add_training_args,
    bounded,
    check_training_args,
    command_line,
    existing_file,
    existing_folder,
    lazy_main,
    model_config_source,
    model_source,
    script_entry,
)
from cmal.training.tasks import TASKS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=list(TASKS), help="A task of the registry (training/tasks.py), "
                   "which `register_task` extends before `main` is called.")
    data = p.add_argument_group("data")
    data.add_argument("--train_file", default=None, type=existing_file, help="The task's training file in its original format; "
                      "without it, the synthetic world. VQA: questions JSON; VE: jsonl; NLVR2: json lines; "
                      "REC: refs .p/.json; retrieval: Karpathy JSON.")  # fmt: skip
    data.add_argument("--validation_file", default=None, type=existing_file, help="Default for REC/retrieval: --train_file (split by name).")
    data.add_argument("--train_annotations", default=None, type=existing_file, help="VQA: annotations JSON; REC: COCO instances.json.")
    data.add_argument("--validation_annotations", default=None, type=existing_file, help="Default: --train_annotations for REC.")
    data.add_argument("--train_split", default="train", help="REC/retrieval: split name inside the file.")
    data.add_argument("--validation_split", default="val", help="REC/retrieval: split name inside the file.")
    data.add_argument("--regions", default=None, type=existing_folder, help="Region store (docs/DATA.md) of the images of the real data.")
    data.add_argument("--image_id_template", default="{}",
                      help="Maps the files' image ids to the store's, e.g. COCO_train2014_{:012d}.")
    data.add_argument("--validation_image_id_template", default=None,
                      help="The same for the validation file (VQA val2014 images: COCO_val2014_{:012d}); default: --image_id_template.")  # fmt: skip
    data.add_argument("--min_answer_count", type=POSITIVE_INT, default=None,
                      help="VQA answers kept in the vocabulary: majority answer of >= N training questions "
                           "(default 9 on real data, 1 on the synthetic world).")  # fmt: skip
    data.add_argument("--synthetic_images", type=POSITIVE_INT, default=2000, help="Images of the synthetic world.")
    data.add_argument("--synthetic_seed", type=NON_NEGATIVE_INT, default=0, help="Seed of the synthetic world.")
    data.add_argument("--max_text_length", type=bounded(int, 3), default=40, help="Word pieces per text, [CLS]/[SEP] included.")
    data.add_argument("--max_train_samples", type=POSITIVE_INT, default=None, help="Use only the first N training examples.")
    data.add_argument("--max_eval_samples", type=POSITIVE_INT, default=None, help="Evaluate only the first N examples.")
    data.add_argument("--retrieval_eval_images", type=POSITIVE_INT, default=50,
                      help="Retrieval: score every text of the first N validation images against those N images.")
    model = p.add_argument_group("model")
    model.add_argument("--model_name_or_path", default=None, type=model_source, help="A pre-trained CMAL folder or Hub id; none: from scratch.")
    model.add_argument("--model_config", default="mini", type=model_config_source, help=f"From scratch: preset ({', '.join(PRESET_NAMES)}) or JSON.")
    model.add_argument("--tokenizer", default=None, type=model_source, help="From scratch: a fast BERT-style tokenizer (default: word-level).")
    model.add_argument("--anchor_mask_prob", type=PROBABILITY, default=None,
                       help="Anchor swaps while fine-tuning (default: the checkpoint's value).")  # fmt: skip
    model.add_argument("--negative_probability", type=PROBABILITY, default=0.5, help="Retrieval: share of mismatched pairs.")
    add_training_args(p, None, batch_size=32, learning_rate=3e-4, epochs=4, warmup=50)
    p.add_argument("--per_device_eval_batch_size", type=POSITIVE_INT, default=64)
    p.add_argument("--eval_steps", type=NON_NEGATIVE_INT, default=0,
                   help="Also score the validation split every N steps: `learning_curve` in train_results.json.")
    p.add_argument("--synthetic_test", action="store_true",
                   help="Synthetic world only: after training, also score its test split once (`test_results.json`, "
                        "each item's score too, for intervals by resampling items).")
    args = p.parse_args(argv)
    args.output_dir = args.output_dir or f"outputs/cmal-{args.task}"
    args.command = command_line("training/finetune.py", argv)
    check_training_args(p, args)
    if args.train_file is None and any([args.validation_file, args.train_annotations, args.regions]):
        p.error("--validation_file, --train_annotations and --regions need --train_file (real data)")
    if args.train_file is not None and args.synthetic_test:
        p.error("--synthetic_test scores the synthetic world's test split: it cannot go with --train_file (real data)")
    if args.train_file is not None and args.regions is None:
        p.error("real data (--train_file) needs --regions, the region store of its images")
    task = TASKS[args.task]
    per_file_annotations = "annotations" in task.reader_args and not task.split_by_name
    if per_file_annotations and args.validation_file and not args.validation_annotations:
        p.error(f"{task.name.upper()} --validation_file needs --validation_annotations: without answers there is nothing to score")
    return args


main = lazy_main(parse_args, "cmal.training.finetune_run")


if __name__ == "__main__":
    script_entry(main)
