"""Fixtures of the training tests."""
import pytest
import torch

from mmr_ext.nn import zoo as models

from train.ddp_worker import tiny


@pytest.fixture(autouse=True)
def _tiny_model():
    models.MODELS.setdefault("tiny", tiny)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
