"""Checkpoint files: atomic writes, also when the disk fills up."""
import errno
import os

import pytest
import torch

from mmr_ext.train import checkpoint as ckpt_mod
from mmr_ext.outputs import OutputError
from mmr_ext.train.checkpoint import load_checkpoint, save_checkpoint

from faults import fail_writes


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"model_name": "tiny", "in_shape": [1, 28, 28], "num_classes": 10, "model_state": {}})

    def failing_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"model_name": "other"})
    monkeypatch.undo()
    assert load_checkpoint(path)["model_name"] == "tiny"
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EACCES])
def test_a_failing_save_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model_name": "tiny", "in_shape": [1, 28, 28], "num_classes": 10, "model_state": {},
                           "epoch": 1})
    fail_writes(monkeypatch, "checkpoint.pt", error=error)  # the disk fills up (or permissions change) mid-run
    with pytest.raises(OutputError) as info:
        save_checkpoint(path, {"model_name": "tiny", "in_shape": [1, 28, 28], "num_classes": 10,
                               "model_state": {"w": torch.zeros(1000)}, "epoch": 2})
    monkeypatch.undo()
    assert isinstance(info.value, OSError) and info.value.errno == error
    assert f"cannot write checkpoint '{path}'" in str(info.value)
    assert os.strerror(error) in str(info.value)
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left


def test_save_into_a_path_under_a_regular_file_names_it(tmp_path):
    (tmp_path / "plain").write_text("x")
    with pytest.raises(OutputError, match="cannot write checkpoint .*plain/run/checkpoint.pt"):
        save_checkpoint(tmp_path / "plain" / "run" / "checkpoint.pt", {"model_name": "tiny"})
