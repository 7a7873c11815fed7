"""Ask a CMAL checkpoint a question about a photo. The whole thing is three lines:

    from transformers import pipeline
    vqa = pipeline("visual-question-answering", model="path/to/cmal-vqa", trust_remote_code=True)
    vqa(image="photo.jpg", question="what is on the table?")   # [{'score', 'answer', 'unknown_words', 'weak_detections'}, ...]

`trust_remote_code=True` runs the model, processor and pipeline code shipped inside the checkpoint,
so nothing but transformers and torch is needed. A checkpoint knows only what it was trained on: each answer
says which question words it could not read (`unknown_words`) and whether its detector was sure of nothing in
the image (`weak_detections`); this script prints both. The checkpoint must carry a detector
(`config.detector_config`) to read raw photos; any fine-tuned folder also answers on precomputed
regions (`vqa(regions=..., question=...)`, see docs/FINETUNING.md).

With no arguments it asks the checkpoint these commands make (offline, about 10 minutes on 2 CPU cores)
about a rendered image of the synthetic world's validation split:

    python training/train_detector.py
    accelerate launch -q --config_file training/configs/one_process.yaml training/pretrain.py --detector outputs/detector-synthetic --output_dir outputs/cmal-mini-detector
    python training/finetune.py --task vqa --model_name_or_path outputs/cmal-mini-detector --output_dir outputs/vqa-synthetic-detector

    python examples/quickstart.py                                    # that checkpoint, that image
    python examples/quickstart.py --model outputs/my-vqa --image photo.jpg --question "what is on the table?"
"""

import argparse
import os

from transformers import pipeline


DEFAULT_MODEL = "outputs/vqa-synthetic-detector"  # what the three commands of the docstring make
DEFAULT_QUESTION = "what colour is the large ring?"  # a validation question of the default image (answer: black)


def default_image(synthetic_images: int = 2000, seed: int = 0) -> str:
    """Image synthetic-000001 of the world the commands above train on (a validation image), rendered."""
    from cmal.training.data import synthetic

    return os.path.join(synthetic.write_images(synthetic.default_world(num_images=synthetic_images, seed=seed)),
                        "synthetic-000001.png")  # fmt: skip


def missing_default_message() -> str:
    commands = [line for line in __doc__.splitlines() if line.startswith(("    python training", "    accelerate launch"))]
    return f"{DEFAULT_MODEL} does not exist yet; make it (from the repository root) with\n" + "\n".join(commands)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="folder or Hub id of a CMAL VQA checkpoint with a detector")
    parser.add_argument("--image", default=None, help="path or URL of the photo (default: a rendered synthetic-world image)")
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--top_k", type=int, default=5, help="how many answers to print")
    args = parser.parse_args(argv)
    if args.model == DEFAULT_MODEL and not os.path.isdir(DEFAULT_MODEL):
        parser.error(missing_default_message() + "\nor pass --model (a folder or Hub id of a CMAL VQA checkpoint with a detector)")
    args.image = args.image or default_image()

    vqa = pipeline("visual-question-answering", model=args.model, trust_remote_code=True)
    answers = vqa(image=args.image, question=args.question, top_k=args.top_k)

    print(f"Q: {args.question}")
    for answer in answers:
        print(f"{answer['score']:.4f}  {answer['answer']}")
    if answers[0]["unknown_words"]:
        print(f"unknown words (the checkpoint reads them as [UNK]): {', '.join(answers[0]['unknown_words'])}")
    if answers[0]["weak_detections"]:
        print("the detector is sure of nothing in this image: it is unlike the checkpoint's training images, and "
              "the answers are guesses")  # fmt: skip
    return answers


if __name__ == "__main__":
    main()
