"""Every error path of model parsing and of bad input (issue: foundation, item 4 and 6)."""
import math

import pytest
import torch
from torch import nn

import mmr_ext
from mmr_ext.nn.chain import parse_model

APIS = [mmr_ext.region_distances, mmr_ext.region_distances_reference]


@pytest.mark.parametrize("layer, kind", [
    (nn.MaxPool2d(2), "MaxPool2d"), (nn.Sigmoid(), "Sigmoid"), (nn.Tanh(), "Tanh"),
    (nn.Conv1d(1, 1, 1), "Conv1d"),
])
def test_unsupported_layers_name_layer_and_position(layer, kind):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Sequential(nn.Identity(), layer), nn.Flatten(),
                          nn.Linear(8, 2))
    with pytest.raises(NotImplementedError, match=rf"'2\.1' \({kind}\)"):
        parse_model(model)


def test_train_mode_batchnorm_and_dropout_are_rejected():
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\) is in training mode"):
        parse_model(bn)
    parse_model(bn.eval())
    no_stats = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.ReLU(),
                             nn.Linear(4, 2)).eval()
    with pytest.raises(ValueError, match="track_running_stats=False"):
        parse_model(no_stats)
    drop = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'2' \(Dropout\) is in training mode"):
        parse_model(drop)
    parse_model(drop.eval())
    parse_model(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Dropout(0.0), nn.Linear(4, 2)))


def test_structural_errors():
    class Net(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(ValueError, match="must be a torch.nn.Sequential.*Net"):
        parse_model(Net())
    with pytest.raises(ValueError, match="ends with the activation '1'"):
        parse_model(nn.Sequential(nn.Linear(3, 2), nn.ReLU()))
    with pytest.raises(ValueError, match="two activations in a row"):
        parse_model(nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.ReLU(), nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="no affine layers"):
        parse_model(nn.Sequential())


@pytest.fixture
def small():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    return model, torch.rand(2, 4, dtype=torch.float64)


@pytest.mark.parametrize("api", APIS)
def test_bad_input_tensors(api, small):
    model, x = small
    bad = x.clone()
    bad[0, 1] = math.nan
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        api(model, bad, 2)
    bad[0, 1] = math.inf
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        api(model, bad, 2)
    with pytest.raises(ValueError, match="non-empty batch"):
        api(model, x[0], 2)
    with pytest.raises(ValueError, match="non-empty batch"):
        api(model, x[:0], 2)
    with pytest.raises(ValueError, match="does not fit the model"):
        api(model, torch.rand(2, 7, dtype=torch.float64), 2)
    with pytest.raises(TypeError, match="float32 or float64"):
        api(model, x.half(), 2)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        api(model, x.numpy(), 2)
    with pytest.raises(TypeError, match="model tensor '0.weight' is torch.float64 but x is torch.float32"):
        api(model, x.float(), 2)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("p", [0.5, 0, -1, math.nan])
def test_p_below_one(api, small, p):
    model, x = small
    with pytest.raises(ValueError, match="p must be >= 1"):
        api(model, x, p)


@pytest.mark.parametrize("api", APIS)
def test_p_wrong_type_and_labels(api, small):
    model, x = small
    with pytest.raises(TypeError, match="p must be a real number"):
        api(model, x, "2")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        api(model, x, 2, labels=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        api(model, x, 2, labels=torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        api(model, x, 2, labels=torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        api(model, x, 2, labels=torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("api", APIS)
def test_device_mismatch(api, small):
    model, x = small
    meta_x = torch.empty(2, 4, dtype=torch.float64, device="meta")
    with pytest.raises((ValueError, NotImplementedError)):
        api(model, meta_x, 2)
