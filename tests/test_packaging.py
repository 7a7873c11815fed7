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


SCRIPTS = ["pretrain", "finetune", "extract_regions", "train_detector", "push_to_hub"]
HEAVY = ("torch", "transformers", "datasets", "accelerate")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_answers_without_loading_torch(script):
    """`--help` builds the parser only: none of torch, transformers, datasets or accelerate is imported (each costs
    seconds; `python training/pretrain.py --help` took 5.8 s when they were)."""
    probe = ("import runpy, sys\n"
             f"sys.argv = ['{script}.py', '--help']\n"
             f"try:\n    runpy.run_path('training/{script}.py', run_name='__main__')\n"
             "except SystemExit as done:\n    assert done.code == 0, done.code\n"
             f"print(sorted(name for name in {HEAVY!r} if name in sys.modules))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.startswith("usage: ") and "--help" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_light_name_lists_match_what_they_stand_for():
    """The scripts' parsers list presets without loading them; the list must stay the real one."""
    import cmal
    from cmal.modeling_cmal import CMAL_PRESETS
    from cmal.processors import __all__ as processor_names
    from cmal.modeling_cmal import __all__ as model_names
    from cmal.training.arguments import PRESET_NAMES

    assert PRESET_NAMES == tuple(CMAL_PRESETS)
    assert sorted(cmal.__all__) == sorted([*model_names, *processor_names])  # the lazy package exports every name
