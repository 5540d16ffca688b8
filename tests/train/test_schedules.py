"""Hyperparameter schedules: the papers' per-epoch k_B decay, λ warm-up and lr drop, per-step short runs."""
import pytest

from mmr_ext.train.schedules import Schedule


def test_paper_schedule_per_epoch():
    s = Schedule(epochs=100, k_start=0.2, k_end=0.05, warmup_epochs=10, lr_drop_epochs=10)
    assert s.k_boundary(0) == pytest.approx(0.2) and s.k_boundary(99) == pytest.approx(0.05)
    assert s.k_boundary(33) == pytest.approx(0.2 - 0.15 * 33 / 99)
    assert s.lam_scale(0) == pytest.approx(0.1) and s.lam_scale(5) == pytest.approx(0.55)
    assert s.lam_scale(10) == 1.0 and s.lam_scale(60) == 1.0
    assert [s.lr_scale(e) for e in (0, 89, 90, 99)] == [1.0, 1.0, 0.1, 0.1]
    # per-epoch: every step of an epoch sees the same values
    assert s.values(7, 0, 50) == s.values(7, 49, 50)


def test_step_schedule_scales_to_short_runs():
    s = Schedule(epochs=3, k_start=0.1, k_end=0.02, warmup_epochs=0.3, lr_drop_epochs=0.3, unit="step")
    assert s.k_boundary(0, 0, 10) == pytest.approx(0.1) and s.k_boundary(2, 9, 10) == pytest.approx(0.02)
    ks = [s.k_boundary(e, i, 10) for e in range(3) for i in range(10)]
    assert all(a > b for a, b in zip(ks, ks[1:]))
    assert s.lam_scale(0, 0, 10) == pytest.approx(0.1) and s.lam_scale(0, 1, 10) == pytest.approx(0.4)
    assert s.lam_scale(0, 3, 10) == 1.0
    assert s.lr_scale(2, 6, 10) == 1.0 and s.lr_scale(2, 7, 10) == 0.1
    assert Schedule.from_state_dict(s.state_dict()) == s


@pytest.mark.parametrize("kw, word", [(dict(epochs=0), "epochs"), (dict(epochs=5, k_start=0), "k_start"),
                                      (dict(epochs=5, k_end=1.5), "k_end"),
                                      (dict(epochs=5, warmup_epochs=6), "warmup_epochs"),
                                      (dict(epochs=5, unit="batch"), "unit")])
def test_schedule_rejects_bad_values(kw, word):
    with pytest.raises(ValueError, match=word):
        Schedule(**kw)
