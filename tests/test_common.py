import argparse
import os

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
