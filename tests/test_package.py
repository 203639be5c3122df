"""The package as a newcomer meets it: `malloc.__version__` is the distribution's version, and `dir(malloc)` and
`__all__` show the API, not the helpers the package imports for itself."""

import importlib.metadata
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import malloc

ROOT = Path(__file__).resolve().parent.parent


def test_version_is_the_installed_distributions_and_pyprojects() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert malloc.__version__ == importlib.metadata.version("malloc") == declared


def test_version_has_a_fallback_in_a_source_tree_never_installed(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "src" / "malloc", tmp_path / "malloc", ignore=shutil.ignore_patterns("__pycache__"))
    # -S: no site-packages, so no installed metadata for malloc anywhere on the path
    out = subprocess.run([sys.executable, "-S", "-c", "import malloc; print(malloc.__file__, malloc.__version__)"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(tmp_path / "malloc" / "__init__.py"), "0+unknown"]


def test_dir_shows_the_api_and_no_helper_imports() -> None:
    public = {name for name in dir(malloc) if not name.startswith("_")}
    assert public == set(malloc.__all__)
    assert len(malloc.__all__) == len(set(malloc.__all__))
    assert all(hasattr(malloc, name) for name in malloc.__all__)
    assert "__version__" in dir(malloc)
    for helper in ("annotations", "sys", "os", "TextIO", "Recorder", "size_arg", "format_stats", "heap"):
        assert helper not in dir(malloc), helper


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from malloc import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(malloc.__all__)


def test_an_unknown_attribute_is_still_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_function"):
        malloc.no_such_function  # type: ignore[attr-defined]  # noqa: B018
