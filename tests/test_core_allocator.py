"""attnx.reuse_freed_memory: glibc keeps freed memory for the next allocation."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

#: measured allocations: enough that one heap growth (a tensor's metadata may split the freed
#: block, so the next block no longer fits in it once) stays below the bound
ROUNDS = 40

PROBE = textwrap.dedent(
    """
    import resource, sys, torch
    import attnx
    # the library loaded, as in a run that explains (import attnx alone loads it on first use): in a
    # bare interpreter's small heap a tensor's metadata may split the freed block at every round
    attnx.Explainer
    if sys.argv[1] == "reuse":
        assert attnx.reuse_freed_memory()
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    # warm-up: the heap grows to hold the block (faulted in once); in a process that has imported
    # little (``import attnx`` is light) the first tensors' metadata splits the freed block a few
    # times more before the small bins hold it (measured: growths in the first 6 rounds, none after)
    for _ in range(8):
        x = torch.ones(64 * 2**20 // 4)  # 64 MB: above glibc's largest default mmap threshold
        del x
    before = faults()
    for _ in range(int(sys.argv[2])):
        y = torch.ones(64 * 2**20 // 4)
        del y
    print(faults() - before)
    """
)


def page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode, str(ROUNDS)], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    """ROUNDS 64 MB tensors after two were freed: with the default setting every one faults its
    16k pages in again; with freed memory kept, (almost) none do."""
    default, reused = page_faults("default"), page_faults("reuse")
    pages = ROUNDS * 64 * 2**20 // 4096
    assert default > pages // 2, default
    assert reused < pages // 20, reused


def test_the_attnx_command_keeps_freed_memory(monkeypatch, capsys):
    """The console script (its own process) applies the setting before running the command."""
    import attnx
    import attnx.cli

    called = []
    monkeypatch.setattr(attnx, "reuse_freed_memory", lambda: called.append(True) or True)
    monkeypatch.setattr(sys, "argv", ["attnx", "methods"])
    assert attnx.cli.command() == 0
    assert called == [True] and "transformer_attribution" in capsys.readouterr().out



HEAP_PROBE = textwrap.dedent(
    """
    import resource, torch
    from attnx.core.allocator import MMAP_THRESHOLD_MAX, keep_heap_blocks
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    before = faults()
    keep_heap_blocks()
    print(faults() - before)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keeping_heap_blocks_faults_no_page_in():
    """The block that raises glibc's thresholds is allocated and freed untouched: its 8,192 pages
    are never faulted in (a call pays nothing for it)."""
    out = subprocess.run([sys.executable, "-c", HEAP_PROBE], capture_output=True, text=True, check=True)
    assert int(out.stdout.strip().splitlines()[-1]) < 64
