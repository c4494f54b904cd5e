"""cpu_allocator: ``reuse`` keeps freed memory in the process (no page faults on the next step's tensors);
``system`` leaves glibc's default, which hands a big freed block straight back to the kernel."""

from __future__ import annotations

import subprocess
import sys

import pytest

from trustcnn.allocator import _glibc, check_mode

pytestmark = pytest.mark.skipif(_glibc() is None, reason="needs glibc malloc (Linux)")

CHILD = """
import sys
from trustcnn.allocator import use_cpu_allocator
import torch

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

changed = use_cpu_allocator(sys.argv[1])
before = rss_mib()
block = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched
during = rss_mib()
del block
after = rss_mib()
print(int(changed), round(during - before), round(after - before))
"""


def _run(mode: str) -> tuple[int, int, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    changed, during, after = map(int, out.stdout.split())
    return changed, during, after


def test_reuse_keeps_a_freed_block_and_system_returns_it() -> None:
    changed, during, after = _run("reuse")
    assert changed == 1 and during >= 250
    assert after >= 250, f"reuse: the freed 256 MiB block went back to the kernel (RSS +{after} MiB after free)"
    changed, during, after = _run("system")
    assert changed == 0 and during >= 250
    assert after < 50, f"system: the freed block stayed in the process (RSS +{after} MiB after free)"


def test_unknown_mode_names_the_choices() -> None:
    with pytest.raises(ValueError, match="cpu_allocator=reuse .* cpu_allocator=system"):
        check_mode("fast")
