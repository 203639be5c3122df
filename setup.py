"""The package's build. With MALLOC_COMPILE=1 in the environment the engine's modules are also compiled with
mypyc into C extensions, which Python then imports in place of the same modules' source (the compiled build);
this needs mypy, setuptools and wheel in the building environment (`pip install --no-build-isolation`), a C
compiler and Python's headers. Without it the package is pure Python."""

import os

from setuptools import setup

ENGINE = ["heap", "bins", "layout", "cache", "process"]  # the hot paths: all typed, no dynamic tricks


def ext_modules() -> list[object]:
    if os.environ.get("MALLOC_COMPILE", "0") in ("", "0"):
        return []
    from mypyc.build import mypycify

    return list(mypycify([f"src/malloc/{name}.py" for name in ENGINE], opt_level="3"))


setup(ext_modules=ext_modules())
