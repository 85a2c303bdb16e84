"""bench.profile: the trace summary (synthetic trace) and one real profiled run on tiny."""

from __future__ import annotations

import json

import pytest

from bench import profile


def run(ts, dur):
    return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}


def node(name, op, ts, dur):
    return {"cat": "Node", "name": name + "_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}


def test_summary_skips_warmup_and_splits_by_op_phase_and_node():
    trace = [run(0, 100), node("h0/MatMul_1", "MatMul", 10, 50),  # warm-up run: dropped
             run(1000, 100), node("h0/MatMul_1", "MatMul", 1010, 30), node("bw/n_Mul_2", "Mul", 1040, 20),
             node("adamw/n/0/m_b1", "Mul", 1060, 10),
             run(2000, 120), node("h0/MatMul_1", "MatMul", 2010, 50), node("bw/n_Mul_2", "Mul", 2060, 20),
             node("adamw/n/0/m_b1", "Mul", 2080, 10)]
    s = profile.summarise(trace)
    assert s["runs"] == 2 and s["run_us"] == 110 and s["kernel_us"] == 70
    assert s["by_op"] == {"MatMul": 40, "Mul": 30}
    assert s["by_phase"] == {"forward": 40, "backward": 20, "adamw": 10}
    assert s["by_node"][0] == ("h0/MatMul_1", "MatMul", 40)
    text = profile.report(s, top=2)
    assert "2 runs: 0.1 ms per run" in text and "adamw" in text and "by op type:" in text


def test_profile_runs_on_tiny(tiny_index, tmp_path, capsys):
    out = tmp_path / "prof.json"
    assert profile.main(["--artifacts", str(tiny_index), "--seq", "16", "--steps", "2", "--threads", "1",
                         "--json", str(out)]) == 0
    s = json.loads(out.read_text())
    assert s["runs"] == 2 and s["kernel_us"] > 0 and s["run_us"] >= s["kernel_us"] * 0.5
    assert all(s["by_phase"][p] > 0 for p in ("forward", "backward", "adamw"))
    assert sum(s["by_phase"].values()) == pytest.approx(s["kernel_us"])
    assert "MatMul" in " ".join(s["by_op"]) and "by phase:" in capsys.readouterr().out
