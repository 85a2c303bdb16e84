"""Per-op profile of the ``ort`` runtime's train step (onnxruntime's own profiler).

    python -m bench.profile --artifacts DIR [--batch 1] [--seq 256] [--steps 3] [--threads N] [--top 25]

Runs the train step with ``SessionOptions.enable_profiling``, drops the first
(warm-up) run, and prints the kernel time summed by op type and the most
expensive nodes, with each one's share of all kernel time. Where a step's
wall time exceeds the kernel sum, the difference is framework overhead
(scheduling, allocation, IO binding).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time


def phase_of(node: str) -> str:
    """Which part of the step a node of train_step.onnx belongs to, by the builder's name
    prefixes (fused nodes keep their first node's name): adamw/..., bw/..., else forward."""
    if node.startswith("adamw/"):
        return "adamw"
    return "backward" if node.startswith("bw/") else "forward"


def summarise(trace: list[dict], skip_runs: int = 1) -> dict:
    """Kernel time (us) by op type and by node, over the model runs after the first ``skip_runs``."""
    runs = sorted((e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    kept = runs[skip_runs:] or runs
    windows = [(r["ts"], r["ts"] + r["dur"]) for r in kept]

    def inside(ts):
        return any(a <= ts <= b for a, b in windows)

    by_op: dict[str, float] = collections.defaultdict(float)
    by_phase: dict[str, float] = {"forward": 0.0, "backward": 0.0, "adamw": 0.0}
    by_node: dict[str, float] = collections.defaultdict(float)
    node_op: dict[str, str] = {}
    for e in trace:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or not inside(e["ts"]):
            continue
        op = e.get("args", {}).get("op_name", "?")
        name = e["name"][: -len("_kernel_time")]
        by_op[op] += e["dur"]
        by_phase[phase_of(name)] += e["dur"]
        by_node[name] += e["dur"]
        node_op[name] = op
    n = max(len(kept), 1)
    return {
        "runs": len(kept),
        "run_us": sum(r["dur"] for r in kept) / n,
        "kernel_us": sum(by_op.values()) / n,
        "by_op": {k: v / n for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
        "by_phase": {k: v / n for k, v in by_phase.items()},
        "by_node": [(k, node_op[k], v / n) for k, v in sorted(by_node.items(), key=lambda kv: -kv[1])],
    }


def report(s: dict, top: int = 25) -> str:
    total = s["kernel_us"] or 1.0
    lines = [f"{s['runs']} runs: {s['run_us'] / 1e3:.1f} ms per run, {s['kernel_us'] / 1e3:.1f} ms in kernels "
             f"({100 * s['kernel_us'] / max(s['run_us'], 1):.0f}%)", "", "by phase:"]
    for phase, us in s["by_phase"].items():
        lines.append(f"  {phase:28s} {us / 1e3:9.2f} ms  {100 * us / total:5.1f}%")
    lines += ["", "by op type:"]
    for op, us in list(s["by_op"].items())[:top]:
        lines.append(f"  {op:28s} {us / 1e3:9.2f} ms  {100 * us / total:5.1f}%")
    lines += ["", "top nodes:"]
    for name, op, us in s["by_node"][:top]:
        lines.append(f"  {op:20s} {us / 1e3:8.2f} ms  {100 * us / total:5.1f}%  {name}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile")
    p.add_argument("--artifacts", required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", help="also write the summary here")
    a = p.parse_args(argv)

    import onnxruntime as ort

    import runtimes
    from bench.worker import batches
    from runtimes.ort import session_options

    rt = runtimes.load(a.artifacts, runtime="ort", threads=a.threads, verify=False)
    so = session_options(a.threads)
    so.enable_profiling = True
    prefix = os.path.join(tempfile.mkdtemp(prefix="ort-profile-"), "train_step")
    so.profile_file_prefix = prefix
    rt._sess = ort.InferenceSession(str(rt.art.path("train_step.onnx")), so, providers=["CPUExecutionProvider"])
    data = batches(rt.art.config["vocab"], a.batch, a.seq)
    times = []
    for i in range(a.steps + 1):
        t = time.perf_counter()
        rt.step(*data[i % len(data)], runtimes.make_hp(1e-4, step=rt.step_count + 1))
        times.append((time.perf_counter() - t) * 1e3)
    path = rt._sess.end_profiling()
    with open(path) as f:
        s = summarise(json.load(f))
    print(f"step ms (first is warm-up): {', '.join(f'{t:.0f}' for t in times)}")
    print(report(s, a.top))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(s, f, indent=1)
    os.remove(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
