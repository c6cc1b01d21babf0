"""Atomic writes: the target is whole or untouched, and no temporary is left behind."""

import os

import pytest

from fbclip_edge.fileio import write_atomic, write_text_atomic


def test_write_text_atomic_replaces_whole_file(tmp_path):
    target = tmp_path / "deep" / "results.json"
    write_text_atomic(target, "first\n")
    write_text_atomic(target, "second\r\n")
    assert target.read_bytes() == b"second\r\n"  # newlines kept as given
    assert oct(os.stat(target).st_mode & 0o777) == oct(0o644)
    assert [p.name for p in target.parent.iterdir()] == ["results.json"]


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "plot.png"
    target.write_bytes(b"old")

    def broken(temporary):
        temporary.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(target, broken)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]
