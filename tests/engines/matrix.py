"""The README's engine matrix: each engine's status and step time on tiny against onnxruntime's.

    .venv/bin/python -m tests.engines.matrix [--artifacts DIR] [--steps 20] [--threads 1]

Builds a tiny folder (unless --artifacts names one), writes the feeds of
tests/test_engine_conformance.py, and runs tests/engines/run_engine.py with ``--time`` for
every engine: onnxruntime from .venv-ort (the baseline), the others from .venv-engines (both
made by ``make test``). Every engine gets the same plain host-array API (no IO binding) and the
same thread count. Prints a Markdown table: load + first step = reading and compiling
train_step.onnx and running its first step (tinygrad compiles its kernels there); ms/step =
median over the timed chained steps (after the 10 checked ones); vs = that median over
onnxruntime's. It measures; the conformance test is what checks the results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "tests" / "engines" / "run_engine.py"
PYTHONS = {"onnxruntime": ROOT / ".venv-ort" / "bin" / "python"}
ENGINES = ("onnxruntime", "openvino", "tract", "tvm", "tinygrad", "onnx2torch")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", type=Path, help="an artifact folder (default: build tiny in a temporary folder)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per engine")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--engines", default=",".join(ENGINES))
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from tests.engines.feeds import write_feeds

    tmp = Path(tempfile.mkdtemp(prefix="engine-matrix-"))
    folder = a.artifacts
    if folder is None:
        from graphgen.artifacts import build_artifacts
        from graphgen.config import GPT2Config

        folder = tmp / "tiny"
        build_artifacts(GPT2Config.preset("tiny"), folder, log=lambda m: None)
    feeds = write_feeds(folder, tmp / "feeds.npz")
    env = {**os.environ, "DEV": "CPU", "CACHEDB": str(tmp / "tinygrad-cache.db"),
           **{v: str(a.threads) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
    rows = []
    for engine in a.engines.split(","):
        py = PYTHONS.get(engine, ROOT / ".venv-engines" / "bin" / "python")
        cmd = [str(py), str(DRIVER), engine, str(folder), str(feeds), str(tmp / f"{engine}.npz"),
               "--time", str(a.steps), "--threads", str(a.threads)]
        print(f"{engine} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        if proc.returncode == 0:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        else:
            last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or ["?"]
            rows.append({"engine": engine, "error": last[0][:160]})
    base = next((r["step_ms"] for r in rows if r["engine"] == "onnxruntime" and "step_ms" in r), None)
    print(f"| engine | version | load + first step, s | ms/step (tiny 2x64, {a.threads} thread) | vs onnxruntime |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['engine']} | | fails: {r['error']} | | |")
        else:
            vs = f"{r['step_ms'] / base:.1f}x" if base else ""
            first = r["train_step_load_s"] + r["first_step_s"]
            print(f"| {r['engine']} | {r['version']} | {first:.1f} | {r['step_ms']:.1f} | {vs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
