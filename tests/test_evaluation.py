"""Tests of mmr_ext.evaluation: LB <= UB, the table against a per-point recomputation, JSON
output and the consistency check (the command line ``mmr-ext evaluate``: tests/test_cli.py)."""
import copy
import importlib
import json
import math

import pytest
import torch
from torch import nn

from mmr_ext.evaluation import EvaluationResult, evaluate
from mmr_ext.evaluation_records import RecordsError

# the module itself (mmr_ext may export a function of the same name)
ev = importlib.import_module("mmr_ext.evaluation")

INF = math.inf
EPS = {1: 0.4, 2: 0.2, INF: 0.08}


@pytest.fixture(scope="module")
def tiny():
    """A small ReLU network on 2x3 "images" and labels that are mostly its predictions."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                          nn.Linear(12, 3)).double().eval()
    with torch.no_grad():  # first-layer hyperplanes through the box
        model[1].weight.mul_(3)
        model[1].bias.copy_(0.2 * model[1].bias - 0.5 * model[1].weight.sum(1))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(30, 1, 2, 3, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:3] = (y[:3] + 1) % 3  # three misclassified points
    result = evaluate(model, x, y, eps=EPS, attack_steps=20, fmn_steps=30, use_mip=True,
                      mip_time_limit=20, batch_size=7, progress=False)
    return model, x, y, result


def pct(mask):
    return 100.0 * mask.double().mean().item()


def test_bounds_are_ordered_and_match_per_point_recomputation(tiny):
    model, x, y, r = tiny
    assert isinstance(r, EvaluationResult) and r.n == 30 and r.norms == (1.0, 2.0, INF)
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    assert torch.equal(r.correct, correct)
    assert r.test_error == pytest.approx(pct(~correct)) and r.test_error == pytest.approx(10.0)
    rows = r.rows()
    for p in (1.0, 2.0, INF):
        att, cert = r.attacked[p], r.certified[p]
        assert not (att & cert).any()
        assert att[~correct].all() and not cert[~correct].any()
        # every verdict comes from a named method
        assert torch.equal(att, torch.stack(list(r.attacked_by[p].values()) + [~correct]).any(0))
        assert torch.equal(cert, torch.stack(list(r.certified_by[p].values())).any(0))
        name = ev.norm_name(p)
        assert rows[name]["LB"] == pytest.approx(pct(att))
        assert rows[name]["UB"] == pytest.approx(pct(~cert))
        assert rows[name]["LB"] <= rows[name]["UB"]
        # the region radius certifies exactly the points it claims
        assert torch.equal(r.certified_by[p]["region"], correct & (r.radius[p] > EPS[p]))
        # a found minimal adversarial norm never lies below a certified radius
        assert (r.min_norm[p][correct] >= r.radius[p][correct]).all()
    union_att = torch.stack([r.attacked[p] for p in r.eps]).any(0)
    union_cert = torch.stack([r.certified[p] for p in r.eps]).all(0)
    assert rows["union"]["LB"] == pytest.approx(pct(union_att))
    assert rows["union"]["UB"] == pytest.approx(pct(~union_cert))
    assert rows["union"]["LB"] <= rows["union"]["UB"]
    assert rows["union"]["UB"] >= max(rows[ev.norm_name(p)]["UB"] for p in r.eps)
    # the evaluation decided something in each direction
    assert any(r.certified[p][correct].any() for p in r.eps)
    assert any(r.attacked[p][correct].any() for p in r.eps)
    assert r.certified_by[1.0]["mip"].any()  # the MIP decides points the bounds leave open
    # MIP ran only on l1 / l∞ and only where needed
    assert all(s is None for s in r.mip_status[2.0])
    for p in (1.0, INF):
        for i, s in enumerate(r.mip_status[p]):
            if s == "verified":
                assert r.certified_by[p]["mip"][i]


def test_table_shows_the_numbers(tiny):
    _, _, _, r = tiny
    text = r.table("tiny")
    lines = text.splitlines()
    assert lines[0] == "tiny"
    assert "l1 (eps=0.4)" in text and "linf (eps=0.08)" in text and "l1+l2+linf" in text
    values = [float(v) for v in lines[4].split()]
    rows = r.rows()
    expected = [rows["TE"]] + [v for k in ("l1", "l2", "linf", "union") for v in (rows[k]["LB"], rows[k]["UB"])]
    assert values == pytest.approx([round(v, 2 if i == 0 else 1) for i, v in enumerate(expected)])
    assert str(r) == r.table()


def test_json_round_trip(tiny, tmp_path):
    _, x, _, r = tiny
    path = r.to_json(tmp_path / "sub" / "eval.json")
    data = json.loads(path.read_text())
    assert data["n"] == x.shape[0]
    assert data["table"] == r.rows()  # floats survive JSON exactly
    assert data["eps"] == {"l1": 0.4, "l2": 0.2, "linf": 0.08}
    pts = data["points"]
    assert pts["correct"] == r.correct.tolist()
    for p in r.eps:
        name = ev.norm_name(p)
        assert pts["attacked"][name] == r.attacked[p].tolist()
        assert pts["certified"][name] == r.certified[p].tolist()
        assert len(pts["min_norm"][name]) == x.shape[0]
    assert set(pts["mip_status"]["linf"]) <= {None, "verified", "falsified", "timeout", "unknown"}


def test_inconsistent_verdicts_raise_loudly(tiny, monkeypatch):
    model, x, y, _ = tiny

    def liar(model64, x64, yb, norms, box, neighbors):  # a broken certifier: everything is safe
        return {p: torch.full((x64.shape[0],), INF, dtype=torch.float64) for p in norms}

    monkeypatch.setattr(ev, "_region_radii", liar)
    with pytest.raises(RuntimeError, match="INCONSISTENT"):
        evaluate(model, x, y, eps={INF: 0.5}, attacks=("fmn",), fmn_steps=30, use_bounds=False,
                 progress=False)


def test_custom_attack_and_settings(tiny):
    model, x, y, _ = tiny
    calls = []

    def shift(model, x, y, *, norm, eps, lo, hi):
        calls.append(norm)
        return x.clone()  # never adversarial

    r = evaluate(model, x[:5], y[:5], eps={"linf": 0.01}, attacks=[shift], use_bounds=False, progress=False)
    assert calls == [INF] and "shift" in r.attacked_by[INF]
    assert not r.attacked_by[INF]["shift"].any()
    assert r.settings["attacks"] == ["shift"]


def test_errors(tiny):
    model, x, y, _ = tiny
    with pytest.raises(ValueError, match="eps key must be 1, 2 or inf"):
        evaluate(model, x, y, eps={3: 0.1}, progress=False)
    with pytest.raises(TypeError, match="eps"):
        evaluate(model, x, y, eps=0.1, progress=False)
    with pytest.raises(ValueError, match="attack"):
        evaluate(model, x, y, eps={1: 0.1}, attacks=("fgsm",), progress=False)
    with pytest.raises(ValueError, match="box"):
        evaluate(model, x + 1, y, eps={1: 0.1}, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, x, y, eps={1: 0.1}, batch_size=0, progress=False)


# ------------------------------------------------------------------------------------------
# deterministic, resumable evaluation: per-point records written as batches finish


FAST = dict(eps=EPS, attack_steps=8, attack_restarts=2, fmn_steps=10, batch_size=7, progress=False)


def same(a, b):
    """Every number of two results but the timing."""
    da, db = a.to_dict(), b.to_dict()
    da.pop("timing"), db.pop("timing")
    return da == db


class Interrupt:
    """Replaces ev._region_radii (called once per computed batch); Ctrl-C at call number ``at``."""

    def __init__(self, at=None):
        self.at, self.calls = at, 0
        self.real = ev._region_radii

    def __call__(self, *a, **kw):
        self.calls += 1
        if self.at is not None and self.calls == self.at:
            raise KeyboardInterrupt
        return self.real(*a, **kw)


def test_evaluate_is_deterministic(tiny):
    model, x, y, _ = tiny
    a = evaluate(model, x, y, **FAST)
    torch.manual_seed(123)  # the global RNG plays no part
    torch.rand(10)
    b = evaluate(model, x, y, **FAST)
    assert same(a, b)
    assert a.settings["batch_size"] == 7 and a.settings["seed"] == 0
    c = evaluate(model, x, y, **dict(FAST, seed=1))
    assert c.settings["seed"] == 1


def test_a_batch_does_not_depend_on_the_batches_before_it(tiny, monkeypatch):
    """The random starts of a batch's attacks come from a generator seeded by the batch's index:
    a first batch that draws nothing (all its points misclassified) changes nothing after it."""
    model, x, y, _ = tiny
    real, states = ev.pgd, []

    def spy(*a, generator=None, **k):
        states.append(generator.get_state().clone())
        return real(*a, generator=generator, **k)

    monkeypatch.setattr(ev, "pgd", spy)
    kw = dict(eps={INF: 0.08}, attacks=("pgd",), attack_steps=2, use_bounds=False, batch_size=7, progress=False)
    evaluate(model, x, y, **kw)
    first = states[:]
    states.clear()
    with torch.no_grad():
        y_wrong = y.clone()
        y_wrong[:7] = (model(x[:7]).argmax(1) + 1) % 3  # batch 0: no attack runs
    evaluate(model, x, y_wrong, **kw)
    assert len(first) == 5 and len(states) == 4
    assert all(torch.equal(a, b) for a, b in zip(first[1:], states))


def test_interrupted_evaluation_resumes_to_the_uninterrupted_result(tiny, tmp_path, monkeypatch):
    model, x, y, _ = tiny
    ref = evaluate(model, x, y, **FAST)
    path = tmp_path / "eval.points.jsonl"
    stop = Interrupt(at=3)  # batches 0 and 1 finish, the third is interrupted
    monkeypatch.setattr(ev, "_region_radii", stop)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, x, y, records=path, **FAST)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["format"] == "mmr_ext.evaluation.points" and lines[0]["n"] == 30
    assert [r["i"] for r in lines if "i" in r] == list(range(14))
    assert [r["batch"] for r in lines if "batch" in r] == [[0, 7], [7, 14]]
    point = lines[1]
    assert set(point["norms"]) == {"l1", "l2", "linf"}
    assert set(point["norms"]["l2"]) == {"radius", "min_norm", "attacked_by", "certified_by"}
    # without resume an existing record file is refused
    with pytest.raises(RecordsError, match="resume"):
        evaluate(model, x, y, records=path, **FAST)
    count = Interrupt()
    monkeypatch.setattr(ev, "_region_radii", count)
    resumed = evaluate(model, x, y, records=path, resume=True, **FAST)
    assert count.calls == 3  # only the batches 14.., 21.., 28.. were computed
    assert same(resumed, ref)
    # a complete file: nothing is recomputed
    again = evaluate(model, x, y, records=path, resume=True, **FAST)
    assert count.calls == 3 and same(again, ref)
    assert again.timing["region"] == pytest.approx(resumed.timing["region"])


def test_resume_after_a_line_cut_short(tiny, tmp_path, monkeypatch):
    model, x, y, _ = tiny
    ref = evaluate(model, x, y, **FAST)
    path = tmp_path / "r.jsonl"
    monkeypatch.setattr(ev, "_region_radii", Interrupt(at=4))
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, x, y, records=path, **FAST)
    text = path.read_text()
    cut = text.rfind('{"batch"')  # a kill inside the last batch line: that batch counts as not done
    path.write_text(text[:cut + 20])
    count = Interrupt()
    monkeypatch.setattr(ev, "_region_radii", count)
    resumed = evaluate(model, x, y, records=path, resume=True, **FAST)
    assert count.calls == 3 and same(resumed, ref)
    assert all(json.loads(line) for line in path.read_text().splitlines())  # the cut line is gone


def test_resume_with_mip_interrupted(tiny, tmp_path, monkeypatch):
    model, x, y, _ = tiny
    kw = dict(FAST, use_mip=True, mip_time_limit=20)
    ref = evaluate(model, x, y, **kw)
    assert sum(s is not None for p in (1.0, INF) for s in ref.mip_status[p]) >= 2
    monkeypatch.setattr(ev, "_MIP_CHUNK", 1)
    real, calls = ev.verify_mip, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    path = tmp_path / "r.jsonl"
    monkeypatch.setattr(ev, "verify_mip", flaky)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, x, y, records=path, **kw)
    assert sum("mip" in json.loads(line) for line in path.read_text().splitlines()) == 1
    monkeypatch.setattr(ev, "verify_mip", real)
    assert same(evaluate(model, x, y, records=path, resume=True, **kw), ref)


@pytest.mark.parametrize("change", ["eps", "seed", "batch_size", "data", "labels", "model", "attacks"])
def test_resume_refuses_records_of_another_evaluation(tiny, tmp_path, change):
    model, x, y, _ = tiny
    path = tmp_path / "r.jsonl"
    kw = dict(FAST, attack_steps=2, fmn_steps=2, use_bounds=False)
    evaluate(model, x[:10], y[:10], records=path, **kw)
    other_model = copy.deepcopy(model)
    with torch.no_grad():
        other_model[1].bias[0] += 1e-9
    x2, y2, m2 = x[:10], y[:10], model
    if change == "eps":
        kw["eps"] = {**EPS, INF: 0.1}
    elif change == "seed":
        kw["seed"] = 1
    elif change == "batch_size":
        kw["batch_size"] = 5
    elif change == "data":
        x2 = x[1:11]
    elif change == "labels":
        y2 = (y[:10] + 1) % 3
    elif change == "model":
        m2 = other_model
    elif change == "attacks":
        kw["attacks"] = ("fmn",)
    with pytest.raises(RecordsError, match="different evaluation") as info:
        evaluate(m2, x2, y2, records=path, resume=True, **kw)
    word = {"eps": "settings.eps.linf", "seed": "settings.seed", "batch_size": "settings.batch_size",
            "data": "data_sha256", "labels": "data_sha256", "model": "model_sha256",
            "attacks": "settings.attacks"}[change]
    assert word in str(info.value) and str(path) in str(info.value)


def test_corrupt_records_are_refused(tiny, tmp_path):
    model, x, y, _ = tiny
    path = tmp_path / "r.jsonl"
    kw = dict(FAST, attack_steps=2, fmn_steps=2, use_bounds=False)
    evaluate(model, x[:10], y[:10], records=path, **kw)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + "\n")
    with pytest.raises(RecordsError, match="corrupt"):
        evaluate(model, x[:10], y[:10], records=path, resume=True, **kw)
    path.write_text('{"weights": 1}\n')
    with pytest.raises(RecordsError, match="not a per-point results file"):
        evaluate(model, x[:10], y[:10], records=path, resume=True, **kw)
    path.write_text("")  # an empty file (killed before the header): a fresh start
    r = evaluate(model, x[:10], y[:10], records=path, resume=True, **kw)
    assert r.n == 10 and path.read_text().count('"batch"') == 2
