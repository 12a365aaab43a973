"""common.allocator: freed image-sized buffers are reused instead of faulted in again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from common.allocator import is_glibc

PROBE = """
import resource, sys
import numpy as np
from common.allocator import keep_freed_memory
tuned = sys.argv[1] == "mallopt" and keep_freed_memory()
def one_file():  # what a file's processing holds at once: read, decoded, blanked copy, output
    buffers = [np.ones(12_800_000, dtype=np.uint16) for _ in range(4)]
    del buffers
one_file()  # the first file settles glibc's own adaptive threshold
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    one_file()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

glibc_only = pytest.mark.skipif(not is_glibc(), reason="tunes glibc's allocator; other C libraries are left alone")


def _faults(mode: str) -> tuple[str, int]:
    """Page faults of the probe's last 5 files, in a fresh process (an operator's tunables left out)."""
    env = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env)
    tuned, count = out.stdout.split()
    return tuned, int(count)


@glibc_only
def test_freed_image_buffers_are_reused_instead_of_faulting_fresh_pages() -> None:
    # Untuned, glibc hands part of a file's freed buffers back to the kernel (they exceed its trim
    # threshold), so the next file faults in and zeroes fresh pages (~12,000 in the probe's 5
    # files); tuned, the freed heap serves the next file.
    untuned = _faults("default")[1]
    assert untuned > 5_000  # the probe does exercise fresh pages
    tuned, in_process = _faults("mallopt")
    assert tuned == "True" and in_process < untuned / 10

