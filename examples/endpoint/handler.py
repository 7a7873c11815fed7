"""Custom handler for Hugging Face Inference Endpoints: CMAL visual question answering.

Hub widgets cannot run custom-code models, so an Endpoint serves CMAL through this handler. Copy
`handler.py` and `requirements.txt` to the root of a CMAL VQA checkpoint repository (one with a
detector, `config.detector_config`) and deploy it with the "Custom" task. A request:

    {"inputs": {"image": "<base64 JPEG/PNG>", "question": "what colour is the large ring?"}, "parameters": {"top_k": 3}}

answers `[{"score", "answer", "unknown_words", "weak_detections"}, ...]`, best first, exactly as
`pipeline("visual-question-answering", model=path, trust_remote_code=True)` does.
"""

import base64
import binascii

from PIL import Image
from transformers import pipeline


class EndpointHandler:
    def __init__(self, path=""):
        self.pipeline = pipeline("visual-question-answering", model=path, trust_remote_code=True)

    def __call__(self, data: dict) -> list[dict]:
        if not isinstance(data, dict):
            raise ValueError(
                'the request body must be a JSON object {"inputs": {"image": <base64 image>, "question": <string>}}, '
                f"got {type(data).__name__}"
            )
        inputs = data.get("inputs")
        if not isinstance(inputs, dict):
            raise ValueError(
                '`inputs` must be an object {"image": <base64 image>, "question": <string>}, '
                f"got {type(inputs).__name__}"
            )
        question = inputs.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"`inputs.question` must be a non-empty string, got {question!r}")
        parameters = data.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ValueError(f'`parameters` must be an object such as {{"top_k": 3}}, got {type(parameters).__name__}')
        top_k = parameters.get("top_k", 5)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"`parameters.top_k` must be a positive integer, got {top_k!r}")
        image = decode_image(inputs.get("image"), self.pipeline.processor.image_processor)
        return self.pipeline(image=image, question=question, top_k=top_k)


def decode_image(value, image_processor) -> Image.Image:
    """A base64 string (optionally a `data:image/...;base64,` URL) -> a PIL image, its size checked against
    the image processor's `max_image_pixels` before it is decoded.

    Decoded here and handed to the pipeline as an image, never as a string: the pipeline would read
    a string as a URL to fetch or a file path on the server.
    """
    if not isinstance(value, str):
        raise ValueError(f"`inputs.image` must be a base64-encoded image string, got {type(value).__name__}")
    if not value:
        raise ValueError("`inputs.image` is an empty string: an empty file, or no image attached")
    encoded = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        raw = base64.b64decode(encoded, validate=True)
    except binascii.Error as error:
        raise ValueError(
            f"`inputs.image` must be a base64-encoded image, got a string of {len(value)} characters that is not "
            f"valid base64 ({error}): {value[:40]!r}"
        ) from None
    return image_processor.open_image(raw, f"`inputs.image` ({len(raw)} bytes of base64)")
