"""Ask a CMAL checkpoint a question about a photo. The whole thing is three lines:

    from transformers import pipeline
    vqa = pipeline("visual-question-answering", model="cmal/cmal-base-vqa", trust_remote_code=True)
    vqa(image="photo.jpg", question="what is on the table?")   # [{'score': ..., 'answer': ...}, ...]

`trust_remote_code=True` runs the model, processor and pipeline code shipped inside the checkpoint,
so nothing but transformers and torch is needed. The checkpoint must carry a detector
(`config.detector_config`) to read raw photos; any fine-tuned folder also answers on precomputed
regions (`vqa(regions=..., question=...)`, see docs/FINETUNING.md).

    python examples/quickstart.py --model outputs/my-vqa --image photo.jpg --question "what is on the table?"
"""

import argparse

from transformers import pipeline


DEFAULT_MODEL = "cmal/cmal-base-vqa"  # placeholder Hub id: pass --model (a Hub id or a fine-tuned folder)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hub id or folder of a CMAL VQA checkpoint with a detector")
    parser.add_argument("--image", default="http://images.cocodataset.org/val2017/000000039769.jpg",
                        help="path or URL of the photo (default: two cats on a sofa, from COCO)")  # fmt: skip
    parser.add_argument("--question", default="how many cats are there?")
    parser.add_argument("--top_k", type=int, default=5, help="how many answers to print")
    args = parser.parse_args(argv)

    vqa = pipeline("visual-question-answering", model=args.model, trust_remote_code=True)
    answers = vqa(image=args.image, question=args.question, top_k=args.top_k)

    print(f"Q: {args.question}")
    for answer in answers:
        print(f"{answer['score']:.4f}  {answer['answer']}")
    return answers


if __name__ == "__main__":
    main()
