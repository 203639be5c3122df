"""mallopt and MALLOC_*_ variables: glibc's names, defaults and rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import malloc
from malloc.options import (
    DEFAULT_MMAP_THRESHOLD,
    DEFAULT_MMAP_THRESHOLD_MAX,
    M_MMAP_MAX,
    M_MMAP_THRESHOLD,
    M_PERTURB,
    M_TOP_PAD,
    M_TRIM_THRESHOLD,
    Options,
)


def test_defaults_are_glibcs() -> None:
    o = Options()
    assert (o.mmap_threshold, o.trim_threshold, o.top_pad, o.mmap_max, o.perturb, o.dynamic) == (
        128 * 1024, 128 * 1024, 128 * 1024, 65536, 0, True)


def test_dynamic_threshold_follows_freed_mapped_chunks_up_to_32_mib() -> None:
    o = Options()
    assert o.freed_mapped_chunk(DEFAULT_MMAP_THRESHOLD) is False  # not larger: no change
    assert o.freed_mapped_chunk(1 << 20) is True
    assert (o.mmap_threshold, o.trim_threshold) == (1 << 20, 2 << 20)
    assert o.freed_mapped_chunk(DEFAULT_MMAP_THRESHOLD_MAX + 4096) is False  # above the maximum
    assert o.mmap_threshold == 1 << 20


@pytest.mark.parametrize("param", [M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX])
def test_setting_a_threshold_stops_the_dynamic_rule(param: int) -> None:
    o = Options()
    assert o.mallopt(param, 4096) == 1
    assert not o.dynamic
    o.freed_mapped_chunk(1 << 20)
    assert o.mmap_threshold == (4096 if param == M_MMAP_THRESHOLD else DEFAULT_MMAP_THRESHOLD)


def test_perturb_keeps_the_low_byte_and_leaves_the_dynamic_rule_on() -> None:
    o = Options()
    o.mallopt(M_PERTURB, 0x1AB)
    assert o.perturb == 0xAB and o.dynamic


@pytest.mark.parametrize(("param", "value", "error"), [
    (99, 1, ValueError),
    (M_MMAP_THRESHOLD, -1, ValueError),
    (M_MMAP_THRESHOLD, 32 * 1024 * 1024 + 1, ValueError),  # glibc refuses above HEAP_MAX_SIZE / 2
    (M_TOP_PAD, 1.5, TypeError),
    ("M_TOP_PAD", 1, TypeError),
])
def test_bad_settings_raise_and_change_nothing(param: object, value: object, error: type[Exception]) -> None:
    o = Options()
    before = Options()
    with pytest.raises(error):
        o.mallopt(param, value)  # type: ignore[arg-type]
    assert o == before


def test_environment_variables_use_glibcs_names() -> None:
    o = Options.from_environment({"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TOP_PAD_": "0x1000",
                                  "MALLOC_TRIM_THRESHOLD_": "1000000", "MALLOC_MMAP_MAX_": "3",
                                  "MALLOC_PERTURB_": "165"})
    assert (o.mmap_threshold, o.top_pad, o.trim_threshold, o.mmap_max, o.perturb, o.dynamic) == (
        65536, 4096, 1000000, 3, 165, False)


def test_a_bad_environment_value_is_ignored_with_a_warning() -> None:
    with pytest.warns(RuntimeWarning, match="MALLOC_MMAP_THRESHOLD_"):
        o = Options.from_environment({"MALLOC_MMAP_THRESHOLD_": "lots"})
    assert o.mmap_threshold == DEFAULT_MMAP_THRESHOLD


def test_the_process_allocator_reads_the_environment_at_start_up() -> None:
    code = ("import json, malloc; o = malloc.allocator.options; p = malloc.malloc(100000); "
            "print(json.dumps([o.mmap_threshold, o.top_pad, p in malloc.allocator.mapped_chunks()])); malloc.free(p)")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TOP_PAD_="8192")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [65536, 8192, True]


def test_mallopt_on_the_allocator_reaches_its_heaps() -> None:
    a = malloc.ProcessAllocator(Options())
    p = a.malloc(100)
    a.mallopt(M_TOP_PAD, 8192)
    assert all(h.top_pad == 8192 for h in a.heaps)
    a.free(p)
