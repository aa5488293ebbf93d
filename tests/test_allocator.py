"""The allocator setting every `retro` command makes: large freed buffers are reused, not faulted in again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from retrocli.allocator import is_glibc

from .conftest import REPO

# Allocate and free a 64 MiB buffer 10 times after one warm-up; print whether the setting took and the page
# faults of the 10 rounds.
CHILD = """
import resource, sys
import numpy as np
from retrocli.allocator import tune_allocator
tuned = tune_allocator()
a = np.ones(8 << 20); del a
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    a = np.ones(8 << 20); del a
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(malloc: str | None) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k != "RETRO_MALLOC"}
    if malloc:
        env["RETRO_MALLOC"] = malloc
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, cwd=REPO,
                         check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not is_glibc(), reason="glibc only")
def test_large_buffers_are_reused_instead_of_faulted_in_again():
    tuned, tuned_faults = faults(None)
    system, system_faults = faults("system")
    assert tuned and not system
    assert system_faults > 100  # glibc's default: every round maps fresh pages
    assert tuned_faults < system_faults / 10
