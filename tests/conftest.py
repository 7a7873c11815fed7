"""Shared fixtures: offline mode, tiny configs and hand-made inputs with known anchors."""

import os


# No Hub in tests: without these every Hub call retries for 20-45 s before failing.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # the Space tests: no calls home
# `pytest -n N` (pytest-xdist): the workers share the cores, each with its part of them, in torch and in the scripts
# the tests start (set before torch is imported). Each choosing from the cores idle at its start would give every
# worker all of them, and a team of threads larger than its cores waits on its slowest at every op.
if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // int(workers))))

import ast  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import psutil  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from cmal.modeling_cmal import CMALConfig  # noqa: E402


VOCAB_SIZE, FEAT_DIM, NUM_CONCEPTS = 99, 16, 10


def tiny_config(**overrides) -> CMALConfig:
    """The `tiny` preset with a small vocabulary and feature size, so tests run in seconds."""
    values = dict(vocab_size=VOCAB_SIZE, visual_feat_dim=FEAT_DIM, num_concepts=NUM_CONCEPTS)
    values.update(overrides)
    return CMALConfig.from_preset("tiny", **values)


def random_visual_pos(batch_size: int, num_regions: int, generator=None, dim: int = 7) -> torch.Tensor:
    """Random valid regions: normalised boxes (x1 <= x2, y1 <= y2) with their width, height and area."""
    from cmal.modeling_cmal.modeling_cmal import boxes_to_visual_pos

    corners = torch.rand(batch_size, num_regions, 2, 2, generator=generator).sort(dim=-1).values  # (x|y, low|high)
    return boxes_to_visual_pos(corners.transpose(-1, -2).reshape(batch_size, num_regions, 4))[..., :dim]


def make_inputs(batch_size=3, text_len=8, num_regions=5, seed=0, pad=True) -> dict:
    """Random text and regions with anchors: concept c sits on token 1 and region 0 of every example.

    With `pad`, the last example has two padding tokens and one padded region, so masking is exercised.
    """
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB_SIZE, (batch_size, text_len), generator=g)
    input_ids[:, 0], input_ids[:, -1] = 1, 2  # stand-ins for [CLS] and [SEP]
    attention_mask = torch.ones(batch_size, text_len, dtype=torch.long)
    visual_attention_mask = torch.ones(batch_size, num_regions, dtype=torch.long)
    token_concept_ids = torch.full((batch_size, text_len), -1)
    region_concept_ids = torch.randint(0, NUM_CONCEPTS, (batch_size, num_regions), generator=g)
    for b in range(batch_size):
        concept = b % NUM_CONCEPTS
        token_concept_ids[b, 1] = concept
        region_concept_ids[b, 0] = concept
    if pad and batch_size > 1:
        attention_mask[-1, -2:] = 0
        input_ids[-1, -2:] = 0
        visual_attention_mask[-1, -1] = 0
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        visual_feats=torch.randn(batch_size, num_regions, FEAT_DIM, generator=g),
        visual_pos=random_visual_pos(batch_size, num_regions, g),
        visual_attention_mask=visual_attention_mask,
        token_concept_ids=token_concept_ids,
        region_concept_ids=region_concept_ids,
    )


def add_shape_colour_image(writer, rng, image_id: str, max_objects: int):
    """Write one image of 1..`max_objects` objects to a region store of 16-d features: one-hot shape (0-3),
    one-hot colour (4-7), noise; random boxes and scores. Returns the objects' (shape ids, colour ids)."""
    import numpy as np

    n = int(rng.integers(1, max_objects + 1))
    shapes, colours = rng.integers(0, 4, n), rng.integers(0, 4, n)
    features = np.zeros((n, 16), np.float32)
    features[np.arange(n), shapes] = 1.0
    features[np.arange(n), 4 + colours] = 1.0
    features[:, 8:] = rng.normal(0, 0.1, (n, 8))
    x, y = np.sort(rng.uniform(0, 1, (n, 2)), axis=1), np.sort(rng.uniform(0, 1, (n, 2)), axis=1)
    writer.add(dict(image_id=image_id, image_width=64, image_height=64, features=features, concept_ids=shapes,
                    boxes=np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], 1), scores=rng.uniform(0.5, 1, n)))  # fmt: skip
    return shapes, colours


SHAPE_NAMES, COLOUR_NAMES = ["dog", "cat", "ball", "box"], ["red", "green", "blue", "white"]


@pytest.fixture(scope="session")
def pretraining_corpus(tmp_path_factory):
    """A `pretrain.py --dataset` folder: 24 images of 1-4 objects whose features encode shape and colour,
    two captions each, and `tiny.json`."""
    import numpy as np
    from datasets import Dataset, DatasetDict

    from cmal.training.data.region_store import RegionStoreWriter

    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    captions = []
    with RegionStoreWriter(str(root / "regions"), feature_dim=16, concept_names=SHAPE_NAMES, source="test", shard_size=10) as w:
        for i in range(24):
            shapes, colours = add_shape_colour_image(w, rng, f"img{i}", max_objects=4)
            words = [f"a {COLOUR_NAMES[c]} {SHAPE_NAMES[s]}" for s, c in zip(shapes, colours)]
            captions.append({"image_id": f"img{i}", "text": "there is " + " and ".join(words) + " here"})
            captions.append({"image_id": f"img{i}", "text": f"{len(shapes)} things, one is {words[0]}"})
    DatasetDict(train=Dataset.from_list(captions)).save_to_disk(str(root / "captions"))
    write_tiny_config(root)
    return root


def pretrain_args(corpus: Path, output_dir, *extra) -> list[str]:
    """`pretrain.py` arguments for a quick tiny run on `pretraining_corpus`."""
    return ["--dataset", str(corpus), "--model_config", str(corpus / "tiny.json"), "--output_dir", str(output_dir),
            "--per_device_train_batch_size", "8", "--report_to", "none", "--num_warmup_steps", "2",
            "--logging_steps", "4", *extra]  # fmt: skip


@pytest.fixture(scope="session")
def synthetic_detector(tmp_path_factory):
    """An untrained RT-DETR of training/train_detector.py's shape, its image processor (128 x 128, /255) and an
    `eval_results.json` as that script writes (with the untrained detector's figures)."""
    from cmal.training import train_detector_run as train_detector

    folder = tmp_path_factory.mktemp("detector")
    torch.manual_seed(0)
    train_detector.RTDetrForObjectDetection(train_detector.detector_config()).save_pretrained(folder)
    train_detector.image_processor().save_pretrained(folder)
    measured = {"validation": {"map_50": 0.0, "map_50_95": 0.0, "images": 6, "objects": 20, "colour_accuracy": 0.1}}
    (folder / "eval_results.json").write_text(json.dumps(measured))  # what train_detector.py writes beside it
    return folder


def write_tiny_config(root: Path) -> None:
    """`root / "tiny.json"`: the `tiny` preset without dropout, for `--model_config`."""
    config = CMALConfig.from_preset("tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (root / "tiny.json").write_text(json.dumps(config.to_dict()))


@pytest.fixture
def config():
    return tiny_config()


@pytest.fixture
def inputs():
    return make_inputs()


REPO = Path(__file__).resolve().parents[1]
WITHOUT_PROJECT = f"""
import importlib.abc, sys

class BlockProject(importlib.abc.MetaPathFinder):
    # The project must not be importable: whatever loads has to come from the saved folder.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {{"cmal", "modeling_cmal", "processors", "training", "model_cards"}}:
            raise ModuleNotFoundError(f"blocked: {{name}}")

sys.meta_path.insert(0, BlockProject())
sys.path = [p for p in sys.path if p not in ("", ".", {str(REPO)!r})]
try:
    import cmal.modeling_cmal
    raise SystemExit("the project is importable")
except ModuleNotFoundError:
    pass
"""


def run_without_project(script: str, folder: Path, tmp_path: Path) -> dict:
    """Run `script` (which prints one JSON line) in a fresh Python where the project cannot be imported.

    This is how a Hub user without the project loads a checkpoint: through `trust_remote_code`.
    """
    path = tmp_path / "run_without_project.py"
    path.write_text(WITHOUT_PROJECT + script)
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "PATH": "/usr/bin:/bin"}  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(path), str(folder)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_snippet(code: str, source: str, workdir: Path, links: dict | None = None, **inputs) -> dict:
    """Run a documentation snippet verbatim in `workdir`, where each path of `links` is made a link to its folder
    (a checkpoint the docs' commands would have made there); returns its variables, with the value of its last line
    as `_` when that is an expression (what a reader sees printed). `inputs` are the values the snippet leaves to
    its reader."""
    tree = ast.parse(code)
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = tree.body[-1]
        tree.body[-1] = ast.fix_missing_locations(ast.copy_location(ast.Assign([ast.Name("_", ast.Store())], last.value), last))
    for name, folder in (links or {}).items():
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / name).symlink_to(Path(folder).resolve(), target_is_directory=True)
    here, namespace = os.getcwd(), dict(inputs)
    os.chdir(workdir)
    try:
        exec(compile(tree, source, "exec"), namespace)
    finally:
        os.chdir(here)
    return namespace


def readme_snippet(after: str) -> str:
    """The first Python block of the project's README.md below the line `after`."""
    text = (REPO / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(after):], re.S)[1]


def run_card_snippet(folder: Path, workdir: Path, **inputs) -> dict:
    """Run the Python snippet of `folder`'s model card (README.md) verbatim (`run_snippet`); returns its variables.

    The snippet loads the model by its repo id (`<your-namespace>/<name>` until pushed): in `workdir`, where it
    runs, that id is made a link to `folder`, so `from_pretrained(repo_id, revision=...)` reads the folder as a
    local path. `inputs` are the values the snippet leaves to its user (one image's region arrays, `left` and
    `right`, `candidates`); a snippet of a checkpoint with a detector reads `photo.jpg` from `workdir`.
    """
    card = (folder / "README.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(snippets) == 1, f"{folder}/README.md has {len(snippets)} Python snippets"
    repo_id = re.search(r'repo_id, revision = "([^"]+)"', snippets[0])[1]
    return run_snippet(snippets[0], str(folder / "README.md"), workdir, {repo_id: folder}, **inputs)


def die_after_saving(monkeypatch, step: int):
    """Make the training loop raise KeyboardInterrupt (as Ctrl-C would) right after saving the checkpoint of
    `step`; returns the function that undoes it, for the resumed run."""
    from cmal.training import loop

    save = loop.save_checkpoint

    def save_then_die(accelerator, run_args, completed, *loss):
        save(accelerator, run_args, completed, *loss)
        if completed == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    return lambda: monkeypatch.setattr(loop, "save_checkpoint", save)


def communicate_or_kill(processes: list, timeout: float) -> list[tuple]:
    """Each launch's `communicate()` output. Whatever still runs after (a timeout, an error) is killed with every
    process it started: torch's elastic agent starts its workers in sessions of their own, which a kill of the
    launcher's process group leaves running (a hung rank then outlived its test and held its port)."""
    try:
        return [process.communicate(timeout=timeout) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                for child in psutil.Process(process.pid).children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        child.kill()
                os.killpg(process.pid, signal.SIGKILL)


def png_header(width: int, height: int, color_type: int) -> bytes:
    """A PNG of `width` x `height` pixels by its header (8-bit, PNG colour type `color_type`) with no pixel data:
    Pillow opens it, so only a size check made before decoding refuses it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)) + chunk(b"IEND", b"")


def broken_images(folder: Path) -> dict[str, tuple[Path, str]]:
    """Files a user may upload as a photo that are not one a model should read, each with the end of the message
    (a regex) that must name it: {name: (path, message after the input's name)}."""
    import io

    import numpy as np
    import PIL.Image

    pixels = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    encoded = {}
    for kind in ("JPEG", "PNG"):
        buffer = io.BytesIO()
        pixels.save(buffer, kind)
        encoded[kind] = buffer.getvalue()
    idat = encoded["PNG"].index(b"IDAT") + 20
    files = {
        "empty.jpg": (b"", r"is an empty file \(0 bytes\), not an image"),
        "text.jpg": (b"not a photo\n", r"is not an image Pillow can read: no image format starts with b'not a photo\\n'"),
        "truncated.jpg": (encoded["JPEG"][: len(encoded["JPEG"]) // 2], r"is truncated or corrupt: Pillow read its header but not its pixels \(image file is truncated"),
        "truncated.png": (encoded["PNG"][: len(encoded["PNG"]) // 2], r"is truncated or corrupt: Pillow read its header but not its pixels \(image file is truncated"),
        "corrupt.png": (encoded["PNG"][:idat] + bytes(200) + encoded["PNG"][idat + 200 :], r"is truncated or corrupt: .*broken data stream"),
        "400mp.png": (png_header(20000, 20000, 2), r"is too large to decode safely \(Image size \(400000000 pixels\) exceeds limit"),
        "81mp-grey.png": (png_header(9000, 9000, 0), r"is 9000x9000 = 81.0 megapixels, above the image processor's `max_image_pixels` \(64 MP\): refused before decoding"),
    }  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: (folder / name, message) for name, (_, message) in files.items()}
