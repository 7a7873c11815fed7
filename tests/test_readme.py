"""The README's "Using the model" snippet runs as written and gives what it says."""

import torch
from conftest import readme_snippet


def test_using_the_model_runs_as_written():
    namespace = {}
    exec(compile(readme_snippet("## Using the model"), "README.md", "exec"), namespace)
    probs, config = namespace["probs"], namespace["config"]
    assert probs.shape == (2, len(config.id2label)) and bool(((probs > 0) & (probs < 1)).all())
    assert torch.allclose(namespace["out"].logits.sigmoid(), probs)
