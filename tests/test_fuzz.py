"""Bounded mutation fuzzing of every loader (tests/fuzz/fuzz.py): 2,000 inputs each, in CI.

Property: every input loads, or raises AdainferError; never a hang (2 s per input), never unbounded memory
(+1 GiB address space), never another exception or a dead process. The long campaign is
`python tests/fuzz/fuzz.py --n 10000`."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
import fuzz  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("loader", list(fuzz.LOADERS))
def test_fuzz_loader(loader):
    result = fuzz.run_in_child(loader, n=2000, seed=1, time_limit=2.0, memory_mb=1024)
    counts = result["counts"]
    assert sum(counts.values()) == 2000
    assert counts.get("loaded", 0) > 0 and counts.get("clean_error", 0) > 0  # the mutations reach both sides
    assert not result["findings"], result["findings"][:3]
