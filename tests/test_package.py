"""The package as a newcomer meets it: `malloc.__version__` is the distribution's version, and `dir(malloc)` and
`__all__` show the API, not the helpers the package imports for itself."""

import importlib.metadata
import re
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


def test_the_repository_carries_every_trace_its_docs_and_benchmark_name() -> None:
    texts = [ROOT / "README.md", ROOT / "traces" / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             ROOT / "bench" / "replay.py"]
    named = {m for path in texts for m in re.findall(r"traces/(?:rep|mtrace)/[\w.-]+\.(?:rep|mtrace)",
                                                      path.read_text())}
    assert "traces/rep/amptjp-bal.rep" in named  # the README's replay example
    assert [name for name in sorted(named) if not (ROOT / name).is_file()] == []
    assert len(list((ROOT / "traces").glob("rep/*.rep"))) == 17
    assert len(list((ROOT / "traces").glob("mtrace/*.mtrace"))) == 1


def test_nothing_names_a_path_outside_the_repository() -> None:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *(p for top in ("src", "tests", "bench") for p in sorted((ROOT / top).rglob("*.py")))]
    outside = [f"{path.relative_to(ROOT)}:{n}" for path in files
               for n, line in enumerate(path.read_text().splitlines(), 1)
               if re.search(r"\.\./shared|/ \"shared\" /|parent\.parent\.parent|parents\[2\]", line)]
    assert outside == []


def test_numpy_stays_optional() -> None:
    """No module of the package imports numpy by name (the compiled build type-checks the package where numpy may
    be missing, as the README's compile command installs none), and without numpy the package works, shared heaps
    and their bytes values included."""
    named = [str(path.relative_to(ROOT)) for path in (ROOT / "src" / "malloc").rglob("*.py")
             if re.search(r"^\s*(import numpy|from numpy)", path.read_text(), re.M)]
    assert named == []
    code = ("import os, sys\n"
            "sys.modules['numpy'] = None  # import numpy fails\n"
            "import malloc\n"
            "h = malloc.SharedHeap.create(f'no-numpy-{os.getpid()}', 1 << 16)\n"
            "try:\n"
            "    h.put('b', b'bytes')\n"
            "    print(bytes(h.get('b')).decode())\n"
            "    h.free(h.malloc(10))\n"
            "    h.check()\n"
            "finally:\n"
            "    h.unlink()\n"
            "    h.close()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "bytes"
