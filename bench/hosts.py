"""The page against Node: tokens/s of the same train_step.onnx in headless Chromium
(onnxruntime-web, wasm on every core, and optionally WebGPU) and in onnxruntime-node.

    python -m bench.hosts [--configs tiny,small] [--steps 12] [--batch 4] [--seq 64]
                          [--threads N] [--webgpu] [--artifacts-dir DIR] [--json PATH]

Both hosts train on byte windows of text (Node on the bundled corpus, the page on its own
corpus.txt) with the same batch shape and thread count; what is timed is the step (the
page's trainStep, Node's step lines as they arrive), never session creation. Medians over
the steps after the first, which compiles kernels (WebGPU shaders) and warms caches.

WebGPU here is SwiftShader, Chromium's software Vulkan device (no GPU on the build
machine): its figure shows that the path runs, not what a GPU would do.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "hosts" / "web"
NODE_TRAIN = ROOT / "hosts" / "node" / "train.mjs"
CORPUS = WEB / "corpus.txt"
CHROMIUM = Path("/usr/bin/chromium")


def _median_after_first(ms: list[float]) -> float:
    if len(ms) < 2:
        raise SystemExit("bench.hosts: need at least 2 steps (the first is not timed)")
    return statistics.median(ms[1:])


def build(config: str, folder: Path) -> None:
    if (folder / "manifest.json").is_file():
        return
    subprocess.run([sys.executable, "-m", "graphgen", "build", "--config", config, "--out", str(folder)],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def node_steps(node: str, folder: Path, steps: int, batch: int, seq: int, threads: int) -> list[float]:
    """Milliseconds between consecutive `step N loss X` lines of hosts/node/train.mjs."""
    cmd = [node, str(NODE_TRAIN), "--artifacts", str(folder), "--steps", str(steps), "--batch", str(batch),
           "--seq", str(seq), "--threads", str(threads), "--data", str(CORPUS)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    stamps = []
    for line in proc.stdout:
        if line.startswith("step "):
            stamps.append(time.perf_counter())
    err = proc.stderr.read()
    if proc.wait() != 0 or len(stamps) != steps:
        raise SystemExit(f"bench.hosts: node failed (exit {proc.returncode}):\n{err[-2000:]}")
    return [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]  # the first step has no predecessor


def start_serve(node: str, args: list[str], wait: float = 20) -> tuple[subprocess.Popen, str | None]:
    """hosts/web/serve.mjs with ``args`` on a free port (--port 0): the process and the URL it
    prints as its first line (None when it printed none within ``wait`` seconds; the caller
    reports that and stops the process). Shared with the page's tests."""
    proc = subprocess.Popen([node, str(WEB / "serve.mjs"), *args, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first: list[str] = []
    reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(wait)
    ok = bool(first) and first[0].startswith("http://")
    return proc, first[0].strip().split("?")[0] if ok else None


def stop_serve(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _Server:
    """hosts/web/serve.mjs on a free port, serving ``arts`` at /artifacts/."""

    def __init__(self, node: str, arts: Path):
        self.proc, self.url = start_serve(node, ["--artifacts", str(arts)])
        if self.url is None:
            self.close()
            raise SystemExit(f"bench.hosts: serve.mjs did not start: {self.proc.stderr.read()[-2000:]!r}")

    def close(self) -> None:
        stop_serve(self.proc)


def page_steps(node: str, url: str, webgpu: bool) -> tuple[list[float], str]:
    """Per-step milliseconds the page logged, and its backend line (e.g. `wasm ×2`)."""
    cmd = [node, str(WEB / "drive.mjs"), "--timeout", "300", "--url", url] + (["--webgpu"] if webgpu else [])
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"bench.hosts: the page failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[0])
    return [e["ms"] for e in result["log"]], result["backend"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hosts", description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="tiny,small", help="comma-separated presets (default tiny,small)")
    p.add_argument("--steps", type=int, default=12, help="steps per host (the first is not timed; default 12)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both hosts (default: all cores)")
    p.add_argument("--webgpu", action="store_true", help="also the page on WebGPU (SwiftShader where there is no GPU)")
    p.add_argument("--artifacts-dir", type=Path, default=Path(tempfile.gettempdir()) / "gpt2-onnx-bench-hosts",
                   help="artifact folders, built there when missing")
    p.add_argument("--json", type=Path, default=Path("runs/bench-hosts.json"))
    a = p.parse_args(argv)
    for flag in ("steps", "batch", "seq", "threads"):
        if getattr(a, flag) < 1 or (flag == "steps" and a.steps < 2):
            p.error(f"--{flag} must be >= {2 if flag == 'steps' else 1}")
    node = shutil.which("node")
    if node is None or not CHROMIUM.exists():
        p.error("needs node on PATH and /usr/bin/chromium (make test installs both)")
    configs = [c for c in a.configs.split(",") if c]

    a.artifacts_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    server = _Server(node, a.artifacts_dir)
    try:
        for config in configs:
            folder = a.artifacts_dir / config
            build(config, folder)
            tokens = a.batch * a.seq
            query = f"?artifacts=/artifacts/{config}&steps={a.steps}&batch={a.batch}&seq={a.seq}&gen=0&threads={a.threads}"
            runs = [("node", f"onnxruntime-node x{a.threads}", node_steps(node, folder, a.steps, a.batch, a.seq, a.threads))]
            ms, backend = page_steps(node, server.url + query + "&ep=wasm", False)
            runs.append(("page", backend, ms))
            if a.webgpu:
                ms, backend = page_steps(node, server.url + query + "&ep=webgpu", True)
                runs.append(("page", backend + " (SwiftShader)", ms))
            base = _median_after_first(runs[0][2])
            for host, backend, ms in runs:
                med = _median_after_first(ms)
                rows.append({"config": config, "host": host, "backend": backend, "batch": a.batch, "seq": a.seq,
                             "median_ms": med, "tokens_per_s": tokens / (med / 1e3), "vs_node": base / med,
                             "step_ms": ms})
                print(f"{config:6s} {host:5s} {backend:32s} {med:9.1f} ms/step {tokens / (med / 1e3):10,.0f} tokens/s"
                      f"  {base / med:5.2f}x node", flush=True)
    finally:
        server.close()
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"threads": a.threads, "cores": os.cpu_count(), "rows": rows}, indent=1))
    print(f"results: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
