"""Checkpoint files: atomic writes."""
import pytest

from mmr_ext.train import checkpoint as ckpt_mod
from mmr_ext.train.checkpoint import load_checkpoint, save_checkpoint


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
