"""Smoke run of benchmarks/reproduce_mnist5k.py: trains, evaluates, resumes and writes the table."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks"))
import reproduce_mnist5k  # noqa: E402

from mmr_ext.native import available  # noqa: E402


@pytest.mark.skipif(not available(), reason="compiled extension missing")
def test_quick_reproduction_writes_consistent_table(tmp_path, capsys):
    args = ["--quick", "--out", str(tmp_path), "--schemes", "plain", "MMR-Universal", "--no-progress"]
    assert reproduce_mnist5k.main(args) == 0
    summary = json.loads((tmp_path / "reproduction.json").read_text())
    assert set(summary["schemes"]) == {"plain", "MMR-Universal"}
    table = (tmp_path / "table.md").read_text()
    for name, entry in summary["schemes"].items():
        rows = entry["table"]
        evaluation = json.loads((tmp_path / name / "evaluation.json").read_text())
        assert evaluation["n"] == 20 and evaluation["table"] == rows
        for col in reproduce_mnist5k.COLUMNS:
            assert rows["TE"] <= rows[col]["LB"] <= rows[col]["UB"] <= 100.0
        assert f"| {name} | mnist5k (ours) | {rows['TE']:.2f} |" in table
        te, _ = reproduce_mnist5k.PAPER_TABLE4[name]
        assert f"| {name} | full MNIST (paper) | {te:.2f} |" in table
    assert (tmp_path / "reproduction.png").stat().st_size > 0
    # a second run reuses the finished training runs and evaluations
    capsys.readouterr()
    assert reproduce_mnist5k.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("training done earlier") == 2 and out.count("evaluation done earlier") == 2
