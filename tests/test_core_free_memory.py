"""The free memory of a device: /proc/meminfo's MemAvailable, psutil where that file is missing."""
from __future__ import annotations

import builtins
import sys
import types

from attnx.core import free_memory


def test_free_cpu_memory_is_meminfo_available():
    with open("/proc/meminfo") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    assert abs(free_memory.free_memory("cpu") - kb * 1024) < 256 * 2**20  # read a moment apart


def test_free_cpu_memory_falls_back_to_psutil(monkeypatch):
    real_open = builtins.open

    def no_proc(path, *args, **kwargs):
        if str(path) == "/proc/meminfo":
            raise OSError("no /proc")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc)
    fake = types.SimpleNamespace(virtual_memory=lambda: types.SimpleNamespace(available=12345))
    monkeypatch.setitem(sys.modules, "psutil", fake)
    assert free_memory.free_memory("cpu") == 12345
    monkeypatch.setitem(sys.modules, "psutil", None)  # not installed
    assert free_memory.free_memory("cpu") is None


def test_human_sizes():
    assert free_memory.human(3 * 2**30) == "3.00 GiB" and free_memory.human(1536 * 2**10) == "1.50 MiB"
    assert free_memory.human(12) == "12 bytes"
