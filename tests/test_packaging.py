"""The distribution installs one `cmal` namespace, with the data files the package reads by path."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> set[str]:
    folder = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(folder), str(REPO)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = folder.glob("cmal-*.whl")
    return set(zipfile.ZipFile(wheel).namelist())


def test_wheel_installs_only_the_cmal_namespace(wheel_files):
    top_level = {name.split("/")[0] for name in wheel_files}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"cmal"}
    for module in ("__init__", "modeling_cmal/modeling_cmal", "modeling_cmal/pipeline_cmal", "processors/processing_cmal",
                   "training/pretrain", "training/finetune", "training/data/synthetic", "model_cards/render",
                   "endpoint/handler"):  # fmt: skip
        assert f"cmal/{module}.py" in wheel_files


def test_wheel_carries_the_files_read_by_path(wheel_files):
    for data in ("training/metrics/vqa_accuracy/vqa_accuracy.py", "training/configs/fsdp.yaml",
                 "model_cards/templates/vqa.md", "endpoint/requirements.txt"):  # fmt: skip
        assert f"cmal/{data}" in wheel_files


@pytest.mark.parametrize("document", ["README.md", "docs/DATA.md", "docs/FINETUNING.md", "docs/BENCHMARKS.md", "CHANGELOG.md"])
def test_documents_link_only_to_files_of_the_repository(document):
    """A reader of a clone (or of the Hub page) can follow every relative link: none leaves the repository."""
    import re

    text = (REPO / document).read_text()
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+://|#|mailto:", t)]
    for target in targets:
        path = ((REPO / document).parent / target).resolve()
        assert path.is_relative_to(REPO) and path.exists(), f"{document} links to {target!r}"
    assert "../shared" not in text
