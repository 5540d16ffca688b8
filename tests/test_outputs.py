"""Tests of mmr_ext.outputs: output paths checked before any work, atomic writes that leave the
previous file and no temporary file behind when the disk is full."""
import errno
import os

import pytest

from mmr_ext import outputs
from mmr_ext.outputs import (OutputError, atomic_write_text, check_output_dir, check_output_file,
                             writing)


def deny(monkeypatch, folder):
    """os.access says 'not writable' for ``folder`` (chmod does not stop root, who runs the tests)."""
    real = os.access
    monkeypatch.setattr(outputs.os, "access",
                        lambda p, mode, **kw: False if os.path.abspath(p) == str(folder) else real(p, mode, **kw))


def test_writable_paths_pass_and_nothing_is_created(tmp_path):
    assert check_output_file(tmp_path / "a" / "b" / "eval.json") == tmp_path / "a" / "b" / "eval.json"
    assert check_output_dir(tmp_path / "run" / "sub") == tmp_path / "run" / "sub"
    (tmp_path / "old.json").write_text("{}")
    check_output_file(tmp_path / "old.json")
    check_output_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]  # no folders, no probe files


@pytest.mark.parametrize("case", ["folder", "under_file", "denied"])
def test_unwritable_output_file(tmp_path, monkeypatch, case):
    (tmp_path / "plain").write_text("x")
    target = {"folder": tmp_path, "under_file": tmp_path / "plain" / "eval.json",
              "denied": tmp_path / "ro" / "eval.json"}[case]
    if case == "denied":
        (tmp_path / "ro").mkdir()
        deny(monkeypatch, tmp_path / "ro")
    with pytest.raises(OutputError) as info:
        check_output_file(target, "results file")
    msg = str(info.value)
    assert f"cannot write results file '{target}'" in msg
    assert {"folder": "is a folder", "under_file": "is a regular file", "denied": "permission denied"}[case] in msg
    assert isinstance(info.value, OSError) and info.value.path == target


@pytest.mark.parametrize("case", ["file", "under_file", "denied", "denied_parent"])
def test_unwritable_output_dir(tmp_path, monkeypatch, case):
    (tmp_path / "plain").write_text("x")
    (tmp_path / "ro").mkdir()
    target = {"file": tmp_path / "plain", "under_file": tmp_path / "plain" / "run",
              "denied": tmp_path / "ro", "denied_parent": tmp_path / "ro" / "new" / "run"}[case]
    if case.startswith("denied"):
        deny(monkeypatch, tmp_path / "ro")
    with pytest.raises(OutputError, match="cannot write output folder") as info:
        check_output_dir(target)
    assert str(target) in str(info.value)


def test_a_folder_where_files_cannot_be_created_is_caught_even_for_root(tmp_path, monkeypatch):
    def full(*a, **kw):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(outputs.tempfile, "mkstemp", full)
    with pytest.raises(OutputError, match="Read-only file system"):
        check_output_dir(tmp_path / "run")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_chmod_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="permission denied"):
            check_output_file(ro / "eval.json")
    finally:
        ro.chmod(0o700)


def test_atomic_write_on_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs.os, "fsync", no_space)
    with pytest.raises(OutputError) as info:
        atomic_write_text(path, "new" * 1000)
    monkeypatch.undo()
    assert str(path) in str(info.value) and "No space left on device (ENOSPC)" in str(info.value)
    assert info.value.errno == errno.ENOSPC
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_writing_names_the_path():
    with pytest.raises(OutputError, match="cannot write output file '/x/y': Permission denied"):
        with writing("/x/y"):
            raise PermissionError(errno.EACCES, "Permission denied")
