"""The run's one progress display: stage costs learnt as they run, guesses before that, the time
left over all stages, one bar."""
import importlib

import pytest

progress = importlib.import_module("mmr_ext.train.progress")


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress.time, "monotonic", c)
    return c


def test_time_left_from_measured_and_guessed_stage_costs(clock):
    run = progress.RunProgress({"train": 10, "evaluate": 4}, guesses={"evaluate": 3.0}, enabled=False)
    assert run.remaining_s() == 0.0  # nothing measured yet
    for _ in range(2):
        clock.now += 2.0
        run.update("train")
    # train: 2 s per step measured; evaluate guessed at 3 steps = 6 s per point
    assert run.remaining_s() == pytest.approx(8 * 2.0 + 4 * 6.0)
    for _ in range(8):
        clock.now += 2.0
        run.update("train")
    clock.now += 50.0  # a pause that belongs to no stage
    run.begin("evaluate")
    clock.now += 10.0
    run.update("evaluate", 2)  # measured: 5 s per point
    assert run.remaining_s() == pytest.approx(2 * 5.0)
    assert run.done == {"train": 10, "evaluate": 2}


def test_the_first_unit_of_a_stage_is_charged_the_time_since_the_last_update(clock):
    run = progress.RunProgress({"train": 1, "certify": 3}, enabled=False)
    clock.now += 1.0
    run.update("train")
    clock.now += 6.0
    run.update("certify", 3)
    assert run.spent == {"train": 1.0, "certify": 6.0}


def test_one_bar_shows_share_done_and_eta(clock, capsys):
    run = progress.RunProgress({"train": 4}, enabled=True, desc="demo")
    clock.now += 1.0
    run.update("train", 1, note="epoch 1/1")
    assert run.bar.n == 250  # 1 s done, 3 s left
    assert "ETA 0:03" in str(run.bar) and "epoch 1/1" in str(run.bar)
    run.write("a line above the bar")
    run.close()
    assert run.bar is None
    assert "a line above the bar" in capsys.readouterr().out
