import argparse
import os
import subprocess
import sys

import pytest

from nanochat.common import add_common_flags, atomic_write, autodetect_device, parse_flags, str2bool


def test_flags_accept_both_forms_booleans_and_bare_separator():
    parser = add_common_flags(argparse.ArgumentParser())
    parser.add_argument("--max_steps", type=int, default=1)
    parser.add_argument("--density_aware", type=str2bool, default=True)
    args = parse_flags(parser, ["--", "--max_steps=5", "--density_aware", "False", "--seed", "3"])
    assert (args.max_steps, args.density_aware, args.seed) == (5, False, 3)
    assert parse_flags(parser, ["--density_aware=1"]).density_aware is True
    with pytest.raises(SystemExit):
        parse_flags(parser, ["--density_aware=maybe"])


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "f.txt"
    atomic_write(path, "old")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        atomic_write(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old" and os.listdir(tmp_path / "sub") == ["f.txt"]
    atomic_write(path, b"bytes")
    assert path.read_bytes() == b"bytes"


def test_device_override_and_cpu_default():
    assert autodetect_device("cpu") == "cpu"
    assert autodetect_device() in ("cuda", "mps", "cpu")


# MiB that freeing a 24 MiB block gives back to the kernel, in a fresh process. glibc's defaults mmap a block this
# large (the first of its size: the default run imports nothing, whose freed blocks could have raised glibc's sliding
# threshold) and unmap it when freed. ctypes' malloc rather than a tensor: nothing else is allocated after the
# block, so it sits at the top of the heap, where a trim would return it.
RETURNED_ON_FREE = """
import ctypes, os, sys
if sys.argv[1] == "keep":
    from nanochat.common import keep_freed_memory
    assert keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
block = libc.malloc(24 * 2**20)
ctypes.memset(block, 1, 24 * 2**20)
before = rss()
libc.free(block)
print((before - rss()) // 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_keeps_a_freed_block():
    # catches a wrong mallopt parameter number or either setting left out: the trim threshold alone freezes the mmap
    # threshold at 128 KiB (the block is mmapped and unmapped), the mmap threshold alone trims the freed heap top.
    # The default run shows the measurement sees memory go back at all.
    returned = {mode: int(subprocess.run([sys.executable, "-c", RETURNED_ON_FREE, mode], capture_output=True,
                                         text=True, check=True).stdout) for mode in ("default", "keep")}
    assert returned == {"default": 24, "keep": 0}
