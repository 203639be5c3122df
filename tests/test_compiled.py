"""The compiled build (`MALLOC_COMPILE=1`, see setup.py): the engine's modules compiled with mypyc must behave
as their source does. The wheel is built once, from a copy of the project, and the engine's tests run again in
a fresh interpreter with it first on the path. Needs a C compiler and Python's headers: skipped without them,
except under CI, whose machine has them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
ENGINE = ["bins", "cache", "heap", "layout", "process"]  # setup.py's list
# Everything that drives the engine itself, misuse and OS facts included.
ENGINE_TESTS = ["test_heap.py", "test_misuse.py", "test_model.py", "test_cache.py", "test_os_facts.py",
                "test_threads.py", "test_fork.py", "test_finalizers.py", "test_walk.py", "test_info.py",
                "test_options.py", "test_trace.py", "test_views.py", "test_shared.py", "test_interrupts.py"]


def test_the_compiled_engine_passes_the_engine_tests(tmp_path: Path) -> None:
    missing = [what for what, there in (
        ("a C compiler", shutil.which("cc") or shutil.which("gcc")),
        ("Python's headers", (Path(sysconfig.get_paths()["include"]) / "Python.h").exists())) if not there]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must build the compiled engine; missing: {', '.join(missing)}")
        pytest.skip(f"cannot compile here; missing: {', '.join(missing)}")
    project = tmp_path / "project"  # built from a copy: an in-place build would leave build/ in the checkout
    project.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                            "-w", str(tmp_path / "wheel"), str(project)], capture_output=True, text=True,
                           env=dict(os.environ, MALLOC_COMPILE="1"), timeout=900)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    assert sorted(p.name.split(".")[0] for p in (site / "malloc").glob("*.so")) == ENGINE
    env = dict(os.environ, PYTHONPATH=str(site))
    files = subprocess.run([sys.executable, "-c", "import malloc.heap as h, malloc.process as p, procfs\n"
                            "print(h.__file__, p.__file__, procfs.SRC_DIR)"],
                           cwd=TESTS, env=env, capture_output=True, text=True, timeout=60)
    heap_file, process_file, children_src = files.stdout.split()
    assert heap_file.endswith(".so") and process_file.endswith(".so"), files.stdout + files.stderr
    assert Path(children_src) == site  # the tests' child processes run the compiled build too
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *ENGINE_TESTS],
                           cwd=TESTS, env=env, capture_output=True, text=True, timeout=900)
    assert tests.returncode == 0, tests.stdout[-5000:] + tests.stderr[-2000:]
