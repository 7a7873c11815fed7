"""Gradio Space: ask CMAL about an uploaded photo, and see the anchor points behind the answer.

Hub widgets cannot run custom-code models, so the model card links this Space instead. The model
(Hub id or folder, with a detector) comes from the `CMAL_MODEL` environment variable (a Space
variable; `CMAL_REVISION` pins a commit). It loads with `trust_remote_code=True`, so the Space needs
neither this project nor anything beyond `requirements.txt`. Copy `examples/visualize_anchors.py`
next to this file.

Unset, `CMAL_MODEL` is the folder the README's commands make (see `examples/quickstart.py`), and the
app offers a rendered image of the synthetic world's validation split as an example:

    python examples/space/app.py                                  # outputs/vqa-synthetic-detector
    CMAL_MODEL=outputs/my-vqa python examples/space/app.py
"""

import importlib.util
import os
import sys
import warnings
from pathlib import Path

import gradio as gr
from transformers import pipeline


# In a Space, visualize_anchors.py sits beside app.py (first on sys.path); in the repository, one folder up.
sys.path.append(str(Path(__file__).resolve().parents[1]))
from visualize_anchors import anchor_picture  # noqa: E402


DEFAULT_MODEL = "outputs/vqa-synthetic-detector"  # what the README's commands make (examples/quickstart.py)
MODEL = os.environ.get("CMAL_MODEL", DEFAULT_MODEL)
REVISION = os.environ.get("CMAL_REVISION")  # the commit whose remote code you reviewed: it runs in the Space


def uploaded_path(payload) -> str | None:
    """The uploaded file's path, unopened: `gr.Image`'s own `preprocess` opens every upload with Pillow (and
    converts it when its mode is not RGB), so a file that is empty, not an image, too large or truncated failed
    inside gradio as a bare "Error". The checkpoint's processor reads it instead, refusing oversized images
    before decoding, and each failure is its own message."""
    return None if payload is None else payload.path or payload.url


def answer_list(id2label: dict, shown: int = 30) -> str:
    names = [id2label[i] for i in sorted(id2label)]
    return ", ".join(names) if len(names) <= shown else ", ".join(names[:shown]) + ", ..."


def caveats(answer: dict, concepts: str) -> str:
    """What the pipeline says about the question and the image (`unknown_words`, `weak_detections`), in words."""
    lines = []
    if answer["unknown_words"]:
        lines.append(f"**Unknown words: {', '.join(answer['unknown_words'])}**: this checkpoint never read them "
                     "(they reach it as an unknown token), so the answer ignores them.")  # fmt: skip
    if answer["weak_detections"]:
        lines.append(f"**The detector is sure of nothing in this image**: this checkpoint knows these concepts: "
                     f"{concepts}. The answers above are guesses.")  # fmt: skip
    return "\n\n".join(lines)


def build_demo(model_path: str, revision: str | None = None, examples: list | None = None) -> gr.Blocks:
    """The interface around one loaded pipeline; `launch()` is left to the caller (tests build it only).
    `examples`: `[image path, question]` rows offered under the inputs."""
    vqa = pipeline("visual-question-answering", model=model_path, revision=revision, trust_remote_code=True)
    concepts = ", ".join(vqa.model.config.concept_names)

    def predict(image, question, top_k):
        """Every error reaches the user as its message (a `gr.Error`), every warning (a long question
        truncated) as a notice; the image is opened by the checkpoint's processor, which refuses images
        above its `max_image_pixels` before decoding them."""
        if image is None:
            raise gr.Error("Upload an image first.")
        if not question or not question.strip():
            raise gr.Error("Type a question about the image.")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                image = vqa.processor.image_processor.open_image(image, "The image")
                answers = vqa(image=image, question=question, top_k=int(top_k))
                picture = anchor_picture(vqa.model, vqa.processor, question, image)
        except ValueError as error:
            raise gr.Error(str(error)) from None
        for warning in {str(w.message) for w in caught if issubclass(w.category, UserWarning)}:
            gr.Warning(warning)
        return {a["answer"]: a["score"] for a in answers}, picture, caveats(answers[0], concepts)

    with gr.Blocks(title="CMAL visual question answering") as demo:
        gr.Markdown(
            f"# CMAL: ask about an image\nModel: `{model_path}`. **It knows only what it was trained on**: its "
            f"detector finds {concepts}, and it answers with one of {len(vqa.model.config.id2label)} answers "
            f"({answer_list(vqa.model.config.id2label)}). Other photos get a guess, and the page says so. Regions "
            "come from the checkpoint's detector; **anchor points** are words of your question that name a detected "
            "region's tag. The bars show where the `[CLS]` token of the last layer looks."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", label="Image")
                image.preprocess = uploaded_path
                question = gr.Textbox(label="Question", placeholder=examples[0][1] if examples else
                                      f"is there a {vqa.model.config.concept_names[0]}?")
                top_k = gr.Slider(1, 10, value=5, step=1, label="Answers")
                ask = gr.Button("Ask", variant="primary")
                if examples:
                    gr.Examples(examples, [image, question])
            with gr.Column():
                answers = gr.Label(label="Answers")
                notes = gr.Markdown(elem_id="caveats")
                anchors = gr.Image(type="pil", label="Regions, anchor points and [CLS] attention", elem_id="anchor-picture")
        gr.on([ask.click, question.submit], predict, [image, question, top_k], [answers, anchors, notes])  # one API endpoint
    return demo


def local_default() -> list:
    """The quickstart's rendered world image and question, for the checkpoint the README's commands make;
    exits naming those commands when it has not been made yet."""
    quickstart = Path(__file__).resolve().parents[1] / "quickstart.py"
    if not quickstart.exists():  # in a Space: nothing local to default to
        sys.exit("Set CMAL_MODEL to a CMAL VQA checkpoint with a detector (a Hub id or folder).")
    spec = importlib.util.spec_from_file_location("quickstart", quickstart)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not os.path.isdir(DEFAULT_MODEL):
        sys.exit(module.missing_default_message())
    return [[module.default_image(), module.DEFAULT_QUESTION]]


if __name__ == "__main__":
    build_demo(MODEL, REVISION, examples=local_default() if MODEL == DEFAULT_MODEL else None).launch(show_error=True)
