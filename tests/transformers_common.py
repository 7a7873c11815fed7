"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`), fetched at test time.

Nothing of transformers' test suite is copied into this repository. `load_common_tests()` takes
`tests/test_modeling_common.py` and `tests/test_configuration_common.py` from the source release
(sdist) of the *installed* transformers version, downloaded with pip, and imports them:

* cache: `$CMAL_TRANSFORMERS_TESTS_CACHE/<version>/`, by default
  `${XDG_CACHE_HOME:-~/.cache}/cmal/transformers-tests/<version>/`. It is built in a temporary folder
  beside it and renamed into place (atomic; a concurrent builder that loses the race drops its copy),
  and reused as-is afterwards. Delete the folder to fetch again.
* sdist: `python -m pip download transformers==<version> --no-binary :all: --no-deps`, or the file
  named by `$CMAL_TRANSFORMERS_SDIST` (offline machines).
* package: the files land in `<cache>/<version>/transformers_tests/` (with an empty `__init__.py`),
  unmodified, and `<cache>/<version>` goes on `sys.path`. They import their siblings relatively
  (`from .generation.test_utils import ...`), so they must live in a package, and the package must
  not be called `tests`: that name belongs to this repository's folder (and to other projects'), and
  the first `tests` on `sys.path` would win. `transformers_tests` clashes with nothing.
* siblings: every relative import of an extracted file is followed; a module the sdist ships is
  extracted too. The sdist ships only the top-level `tests/*.py` files, not `tests/utils/`,
  `tests/generation/` or `tests/exporters/`, so the modules below (imported for one name each) are
  written as stand-ins instead; any other missing module stops the build with an error naming it.
    - `generation.test_utils.GenerationTesterMixin`: an empty class. ModelTesterMixin only uses it in
      `issubclass` checks (CMAL cannot `generate`, so its test class must not inherit it anyway).
    - `exporters.test_export.ExportTesterMixin`: an empty class. It is ModelTesterMixin's base and
      carries the torch.export/ONNX/ExecuTorch export tests, which therefore do not run.
    - `utils.test_configuration_utils.config_common_kwargs`: the non-default values of the common
      `PreTrainedConfig` arguments that `ConfigTester.check_config_arguments_init` sets and reads
      back; built from the installed `PreTrainedConfig.__init__` signature, so it follows the version.
* test-only dependency: `parameterized` (imported by test_modeling_common.py) is in our `test` extra.

When the sdist cannot be had (no network, a dev version that is not on PyPI), the tests are skipped
with the reason, or fail when `CMAL_REQUIRE_TRANSFORMERS_TESTS=1` (set it in CI).
"""

import ast
import importlib
import inspect
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path

import pytest
import transformers


PACKAGE = "transformers_tests"
WANTED = ("test_modeling_common.py", "test_configuration_common.py")
COMPLETE = ".complete"  # written last: a folder without it is an interrupted build

# Values unlike each argument's default, for `config_common_kwargs` (only those the installed
# `PreTrainedConfig.__init__` accepts are used, plus `output_attentions`, a property of every config).
_COMMON_CONFIG_VALUES = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}

_STAND_INS = {
    "generation.test_utils": '''"""Stand-in written by cmal's tests/transformers_common.py: the transformers sdist does not ship
tests/generation/. ModelTesterMixin only uses this class in `issubclass` checks."""


class GenerationTesterMixin:
    pass
''',
    "exporters.test_export": '''"""Stand-in written by cmal's tests/transformers_common.py: the transformers sdist does not ship
tests/exporters/, so the export tests (torch.export, ONNX, ExecuTorch) of ModelTesterMixin's base do not run."""


class ExportTesterMixin:
    pass
''',
    "utils.test_configuration_utils": '''"""Stand-in written by cmal's tests/transformers_common.py: the transformers sdist does not ship
tests/utils/. Non-default values of the common PreTrainedConfig arguments of this transformers version."""

config_common_kwargs = {config_common_kwargs!r}
''',
}


class CommonTestsUnavailable(RuntimeError):
    pass


def cache_root() -> Path:
    if os.environ.get("CMAL_TRANSFORMERS_TESTS_CACHE"):
        return Path(os.environ["CMAL_TRANSFORMERS_TESTS_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "cmal" / "transformers-tests"


def _config_common_kwargs() -> dict:
    accepted = set(inspect.signature(transformers.PreTrainedConfig.__init__).parameters) | {"output_attentions"}
    return {key: value for key, value in _COMMON_CONFIG_VALUES.items() if key in accepted}


def _pip(*args: str, timeout: int = 900) -> None:
    command = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "--no-input"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CommonTestsUnavailable(f"`{' '.join(command)}` timed out after {timeout} s")
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise CommonTestsUnavailable(f"`{' '.join(command)}` failed:\n  " + "\n  ".join(tail))


def _download_sdist(version: str, folder: Path) -> Path:
    given = os.environ.get("CMAL_TRANSFORMERS_SDIST")
    if given:
        return Path(given)
    _pip("download", f"transformers=={version}", "--no-binary", ":all:", "--no-deps", "-d", str(folder))
    found = sorted(folder.glob("transformers-*.tar.gz"))
    if not found:
        raise CommonTestsUnavailable(f"pip downloaded no transformers-*.tar.gz into {folder}")
    return found[0]


def _relative_imports(source: str, relative: str) -> set[str]:
    """Paths (inside the `tests` folder) of the modules that the file at `relative` imports relatively
    (`from .x.y import z`, `from ..x import y`, `from . import x`)."""
    paths = set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        base = relative.split("/")[:-1]  # the importing file's package
        if node.level > 1:
            base = base[: len(base) - (node.level - 1)]
        if node.module:
            paths.add("/".join(base + node.module.split(".")) + ".py")
        else:  # `from . import x`: x is a module of the package (or a name of its __init__)
            paths.update("/".join(base + [alias.name]) + ".py" for alias in node.names)
    return paths


def _extract(sdist: Path, package: Path) -> list[str]:
    """Write the wanted files and the sibling modules they import into `package`; return the stand-ins written."""
    stand_ins = []
    with tarfile.open(sdist) as archive:
        members = {}
        for member in archive.getmembers():
            parts = member.name.split("/")
            if member.isfile() and len(parts) >= 3 and parts[1] == "tests":  # <top>/tests/...
                members["/".join(parts[2:])] = member
        todo, done = list(WANTED), set()
        while todo:
            relative = todo.pop()
            if relative in done:
                continue
            done.add(relative)
            target = package / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            for parent in target.relative_to(package).parents:  # each folder is a package
                (package / parent / "__init__.py").touch()
            module = relative[: -len(".py")].replace("/", ".")
            if relative in members:
                source = archive.extractfile(members[relative]).read().decode("utf-8")
                target.write_text(source, encoding="utf-8")
                todo += sorted(_relative_imports(source, relative))
            elif module in _STAND_INS:
                target.write_text(_STAND_INS[module].format(config_common_kwargs=_config_common_kwargs()))
                stand_ins.append(module)
            else:
                raise CommonTestsUnavailable(
                    f"{sdist.name} lacks tests/{relative}, which the common tests import, and "
                    "tests/transformers_common.py has no stand-in for it"
                )
    return stand_ins


def _build(version: str, folder: Path) -> None:
    root = folder.parent
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=root))
    try:
        build = work / "tree"
        build.mkdir()
        sdist = _download_sdist(version, work / "download")
        _extract(sdist, build / PACKAGE)
        (build / COMPLETE).write_text(f"transformers {version}, from {sdist.name}\n")
        try:
            os.rename(build, folder)  # atomic; fails if another process finished first
        except OSError:
            if not (folder / COMPLETE).is_file():
                shutil.rmtree(folder, ignore_errors=True)  # an interrupted build: replace it
                os.rename(build, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def common_tests_folder(version: str | None = None) -> Path:
    """The cache folder of `version` (default: the installed one), built on first use."""
    version = version or transformers.__version__
    folder = cache_root() / version
    if not (folder / COMPLETE).is_file():
        _build(version, folder)
    return folder


def load_common_tests():
    """Import transformers' common test modules; returns `(test_modeling_common, test_configuration_common)`.

    Skips the calling test module (with the reason) when they cannot be had, unless
    `CMAL_REQUIRE_TRANSFORMERS_TESTS=1`, which makes that an error instead.
    """
    version = transformers.__version__
    try:
        folder = common_tests_folder(version)
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
        with warnings.catch_warnings():  # their marks (flash_attn_test, ...) are registered in transformers' conftest
            warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
            modeling = importlib.import_module(f"{PACKAGE}.test_modeling_common")
            configuration = importlib.import_module(f"{PACKAGE}.test_configuration_common")
    except (CommonTestsUnavailable, ImportError, OSError, tarfile.TarError) as error:
        message = f"transformers' common tests for transformers {version} are unavailable: {error}"
        if os.environ.get("CMAL_REQUIRE_TRANSFORMERS_TESTS") == "1":
            raise RuntimeError(message) from error
        pytest.skip(message, allow_module_level=True)
    return modeling, configuration
