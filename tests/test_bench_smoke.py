"""The benchmark's machinery on the tiny config for two steps: structure only, no timing assertions."""

from __future__ import annotations

import json
import math

import pytest

from bench import run


def test_model_flops_formula():
    # small: 4 layers of d=256, F=1024; 6*N*tokens + 12*L*B*T^2*d + 6*tokens*d*V
    flops, parts = run.model_flops(run.CONFIGS["small"], 1, 256)
    d, f, L, V, T = 256, 1024, 4, 256, 256
    n = L * (4 * d * d + 4 * d + 2 * f * d + f + d + 4 * d) + 2 * d  # q/k/v/o + biases, MLP, 2 LNs; lnf
    assert parts["non_embedding_params"] == n
    assert parts["dense"] == 6 * n * T
    assert parts["attention"] == 12 * L * T * T * d
    assert parts["tied_logits"] == 6 * T * d * V
    assert flops == parts["dense"] + parts["attention"] + parts["tied_logits"]


def test_bench_runs_tiny_and_reports(tiny_index, tmp_path, capsys):
    arts = tmp_path / "arts"
    arts.mkdir()
    (arts / "tiny").symlink_to(tiny_index, target_is_directory=True)
    out = tmp_path / "bench.json"
    rc = run.main(["--configs", "tiny", "--rounds", "2", "--burst", "2", "--threads", "1", "--runtimes", "ort,ort-split,ort-lora,torch",
                   "--artifacts-dir", str(arts), "--reuse", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert set(report) >= {"machine", "builds", "results", "targets", "flop_formula", "method"}
    assert report["builds"] == [{"config": "tiny", "reused": True, "folder": str(arts / "tiny")}]
    (res,) = report["results"]
    assert res["case"] == "tiny 1x64" and res["tokens_per_step"] == 64
    # the batched baseline agrees with the oracle at init
    chk = res["oracle_check"]
    assert chk["max_rel_diff"] < 1e-4 and math.isfinite(chk["losses"]["oracle"])
    assert set(res["participants"]) == {"ort", "ort-split", "ort-lora", "torch"}
    lora = json.loads((arts / "tiny-lora-r8" / "manifest.json").read_text())  # built beside the reused folder
    assert lora["lora"]["rank"] == run.LORA_RANK and lora["frozen"]["parameters"]
    for kind, p in res["participants"].items():
        # 2 rounds of 2 back-to-back steps: the first of each is a re-warm, the second timed
        assert len(p["times_ms"]) == 2 and all(t > 0 for t in p["times_ms"]) and len(p["rewarm_ms"]) == 2
        assert p["median_ms"] > 0 and p["tokens_per_s"] > 0 and p["gflops"] > 0
        assert p["peak_rss_mb"] > 0 and p["pct_sgemm"] > 0
        assert math.isfinite(p["first_loss"])
    assert res["participants"]["torch"]["speed_vs_torch"] == 1.0
    assert "speed_vs_torch" in res["participants"]["ort"] and "rss_vs_torch" in res["participants"]["ort"]
    # same weights, same first batch: every participant's loss before its first update agrees
    assert res["first_loss_max_rel_diff"] < 1e-4
    assert res["sgemm"]["gflops"] > 0
    table = capsys.readouterr().out
    for word in ("ms/step", "tokens/s", "vs torch", "% sgemm", "peak RSS", "tiny 1x64", "numpy sgemm"):
        assert word in table


@pytest.mark.parametrize("args, message", [
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--burst", "-1"], "--burst must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--runtimes", "ort,nope"], "unknown runtimes"),
])
def test_bad_options_stop_before_anything_runs(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run.main(args + ["--artifacts-dir", str(tmp_path / "never"), "--json", str(tmp_path / "never.json")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "never").exists() and not (tmp_path / "never.json").exists()


def test_bench_hosts_runs_node_and_the_page(tiny_index, tmp_path):
    """python -m bench.hosts at tiny for three steps: a row per host with the page's backend
    and positive rates (the page and Node on the same artifacts and batch shape)."""
    import shutil

    from bench import hosts

    if shutil.which("node") is None or not hosts.CHROMIUM.exists():
        pytest.fail("bench.hosts needs node and /usr/bin/chromium, which make test installs")
    for folder in (hosts.WEB, hosts.NODE_TRAIN.parent):
        if not (folder / "node_modules").is_dir():
            pytest.fail(f"{folder} has no node_modules: make test runs npm ci there first")
    arts = tmp_path / "arts"
    arts.mkdir()
    (arts / "tiny").symlink_to(tiny_index, target_is_directory=True)
    out = tmp_path / "hosts.json"
    assert hosts.main(["--configs", "tiny", "--steps", "3", "--threads", "1", "--artifacts-dir", str(arts),
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["host"], r["backend"]) for r in rows] == [("node", "onnxruntime-node x1"), ("page", "wasm ×1")]
    for r in rows:
        assert len(r["step_ms"]) == (2 if r["host"] == "node" else 3) and r["tokens_per_s"] > 0
