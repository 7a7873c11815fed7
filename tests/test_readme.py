"""The README's "Using the model" snippet runs as written and gives what it says."""

import re

import torch
from conftest import REPO


def readme_snippet(after: str) -> str:
    """The first Python block of README.md below the line `after`."""
    text = (REPO / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(after):], re.S)[1]


def test_using_the_model_runs_as_written():
    namespace = {}
    exec(compile(readme_snippet("## Using the model"), "README.md", "exec"), namespace)
    probs, config = namespace["probs"], namespace["config"]
    assert probs.shape == (2, len(config.id2label)) and bool(((probs > 0) & (probs < 1)).all())
    assert torch.allclose(namespace["out"].logits.sigmoid(), probs)
