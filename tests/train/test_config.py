"""Training configuration: the papers' defaults per data set, presets, overrides, clear option errors."""
import math

import pytest

from mmr_ext.train import DATASET_DEFAULTS, PAPER_EPS, ConfigError, TrainConfig, resolve_config


def test_paper_defaults_per_dataset(tmp_path):
    c = resolve_config(TrainConfig(dataset="mnist", data_dir=str(tmp_path)))
    assert c.preset == "paper" and c.epochs == 100 and c.batch_size == 128 and c.schedule_unit == "epoch"
    assert c.lam == (3.0, 12.0) and c.gamma == (1.0, 0.15) and c.lr == 5e-4
    assert c.k_boundary == (0.2, 0.05) and c.warmup_epochs == 10 and c.lr_drop_epochs == 10
    assert c.eps == (1.0, 0.3, 0.1) and c.augment is False
    assert resolve_config(TrainConfig(dataset="fashion-mnist", data_dir=str(tmp_path))).lam == (3.0, 40.0)
    cifar = resolve_config(TrainConfig(dataset="cifar10", data_dir=str(tmp_path)))
    assert cifar.lam == (1.0, 6.0) and cifar.lr == 1e-3 and cifar.augment is True
    assert cifar.eps == pytest.approx((2.0, 0.1, 2 / 255))
    gts = resolve_config(TrainConfig(dataset="gtsrb", data_dir=str(tmp_path)))
    assert gts.lam == (3.0, 12.0) and gts.lr == 1e-3
    mmr = resolve_config(TrainConfig(mode="mmr", p="l2", dataset="mnist", data_dir=str(tmp_path)))
    assert mmr.p == "2" and mmr.k_boundary == (0.1, 0.02) and mmr.gamma == pytest.approx((0.45, 0.45))
    assert mmr.lr == 1e-4 and mmr.k_decision is None
    at = resolve_config(TrainConfig(mode="at", dataset="mnist", data_dir=str(tmp_path)))
    assert at.at_norm == "max" and at.at_steps == 40 and at.at_clean_fraction == 0.0 and at.lam is None
    mat = resolve_config(TrainConfig(mode="mmr+at", p=1, dataset="cifar10", data_dir=str(tmp_path)))
    assert mat.at_norm == "1" and mat.at_clean_fraction == 0.5 and mat.at_steps == 10


def test_demo_preset_and_overrides():
    c = resolve_config(TrainConfig())
    assert c.preset == "demo" and c.mode == "universal" and c.model == "cnn" and c.schedule_unit == "step"
    assert c.lam == (3.0, 12.0) and c.gamma == (1.0, 0.15)
    c = resolve_config(TrainConfig(epochs=7, batch_size=16, lr="1/1000", eps=["1", "0.3", "2/255"]))
    assert (c.epochs, c.batch_size, c.lr) == (7, 16, 1e-3)
    assert c.warmup_epochs == pytest.approx(0.7) and c.eps[2] == pytest.approx(2 / 255)


@pytest.mark.parametrize("kw, argument", [
    (dict(mode="robust"), "mode"), (dict(dataset="imagenet"), "dataset"), (dict(dataset="mnist"), "data_dir"),
    (dict(dataset="cifar10", data_dir="/nonexistent/dir"), "data_dir"), (dict(model="resnet50"), "model"),
    (dict(lam=[3.0]), "lam"), (dict(gamma=[1.0, -0.1]), "gamma"), (dict(eps=[1, 0.3]), "eps"),
    (dict(eps=[1, 0, 0.1]), "eps"), (dict(eps=[1, "x", 0.1]), "eps"), (dict(epochs=0), "epochs"),
    (dict(batch_size=2.5), "batch_size"), (dict(k_boundary=[0.2, 1.5]), "k_boundary"),
    (dict(mode="mmr", p=3), "p"), (dict(mode="at", at_norm="l0"), "at_norm"),
    (dict(mode="at", at_clean_fraction=1.0), "at_clean_fraction"), (dict(at_steps=10), "at_steps"),
    (dict(mode="plain", lam=[1.0]), "lam"), (dict(warmup_epochs=100), "warmup_epochs"),
    (dict(dtype="float16"), "dtype"), (dict(device="tpu"), "device"), (dict(preset="fast"), "preset"),
    (dict(schedule_unit="batch"), "schedule_unit"), (dict(mode="mmr", k_decision=11), "k_decision"),
])
def test_bad_options_name_the_argument(kw, argument):
    with pytest.raises(ConfigError) as info:
        resolve_config(TrainConfig(**kw))
    assert info.value.argument == argument and str(info.value).startswith(argument)


def test_paper_eps_is_the_view_of_the_one_dataset_table(tmp_path):
    # the papers' radii (Croce & Hein, ICLR 2020, Table 1 / Table 4), the defaults of mmr-ext evaluate
    inf = math.inf
    mnist = {1.0: 1.0, 2.0: 0.3, inf: 0.1}
    assert PAPER_EPS == {"mnist": mnist, "mnist5k": mnist, "fmnist": mnist,
                         "gtsrb": {1.0: 3.0, 2.0: 0.2, inf: 4 / 255}, "cifar10": {1.0: 2.0, 2.0: 0.1, inf: 2 / 255}}
    for name, row in DATASET_DEFAULTS.items():
        assert tuple(PAPER_EPS[name].values()) == row["eps"]
        assert resolve_config(TrainConfig(dataset=name, data_dir=str(tmp_path))).eps == row["eps"]


@pytest.mark.parametrize("value, key", [(1, "1"), ("l1", "1"), ("1", "1"), (2.0, "2"), ("L2", "2"),
                                        (math.inf, "inf"), ("linf", "inf"), ("l_inf", "inf"), ("∞", "inf")])
def test_norm_options_take_the_norm_names(value, key):
    assert resolve_config(TrainConfig(mode="mmr", p=value)).p == key
    assert resolve_config(TrainConfig(mode="at", at_norm=value)).at_norm == key
    assert resolve_config(TrainConfig(mode="at", at_norm="MAX")).at_norm == "max"
    with pytest.raises(ConfigError, match="p: must be one of 1, 2, inf, got 'max'"):
        resolve_config(TrainConfig(mode="mmr", p="max"))
