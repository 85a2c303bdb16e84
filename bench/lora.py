"""LoRA against full fine-tuning, and against PEFT on PyTorch eager, in one run.

    python -m bench.lora [--config gpt2] [--batch 1] [--seq 1024] [--rank 8] [--alpha 16]
                         [--targets c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj] [--rounds 2] [--burst 3]
                         [--threads N] [--artifacts-dir DIR] [--reuse] [--json runs/bench_lora.json]

Three participants, each in its own process (bench/worker.py; peak RSS is the
process's own): ``ort`` on the full artifact folder (every weight trained),
``ort`` on a LoRA folder of the same model (rank and targets as given), and
``peft`` (PEFT's LoRA with the same rank and targets on transformers'
GPT2LMHeadModel, AdamW over the adapters, PyTorch eager). All three stay
alive and each round runs a burst of steps of each in turn, so the machine's
drift hits all of them alike (``--sequential``: one process alive at a time, a
fresh one per participant and round, for a machine short of memory); the first
step of a burst re-warms and is not timed. Then both ``ort`` runtimes write a
checkpoint and their sizes are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from bench.run import ROOT, Worker, _run_measured


def _build(config: str, folder: Path, env: dict, reuse: bool, log, lora: list[str]) -> None:
    if reuse and (folder / "manifest.json").is_file():
        log(f"build {folder.name}: reusing {folder}")
        return
    cmd = [sys.executable, "-m", "graphgen", "build", "--config", config, "--out", str(folder), "--force", *lora]
    rc, wall, rss, tail = _run_measured(cmd, env, log)
    if rc != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed (exit {rc}):\n{tail}")
    log(f"build {folder.name}: {wall:.0f} s, peak RSS {rss:.2f} GiB")


def _vm_hwm_mib(pid: int) -> float | None:
    """A live process's peak resident set (VmHWM), MiB; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _checkpoint_bytes(folder: Path, threads: int) -> int:
    import runtimes

    rt = runtimes.load(folder, runtime="ort", threads=threads, verify=False)
    with tempfile.TemporaryDirectory() as d:
        rt.save(Path(d) / "c.safetensors")
        return (Path(d) / "c.safetensors").stat().st_size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lora", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="gpt2")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default="c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj")
    p.add_argument("--rounds", type=int, default=2, help="bursts per participant (default 2)")
    p.add_argument("--burst", type=int, default=3, help="steps per burst, the first untimed (default 3)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--artifacts-dir", type=Path, default=Path(tempfile.gettempdir()) / "gpt2-onnx-bench-lora")
    p.add_argument("--reuse", action="store_true", help="reuse artifact folders already built there")
    p.add_argument("--recompute-attention", action="store_true",
                   help="build both folders with graphgen build --recompute-attention")
    p.add_argument("--sequential", action="store_true",
                   help="one participant process alive at a time (less memory: gpt2's three peak at ~10 GiB together)")
    p.add_argument("--json", type=Path, default=Path("runs/bench_lora.json"))
    a = p.parse_args(argv)
    if a.rounds < 1 or a.burst < 2 or a.threads < 1:
        print(f"error: --rounds {a.rounds}, --burst {a.burst}, --threads {a.threads}: --rounds and --threads must be "
              f">= 1 and --burst >= 2 (the first step of a burst is not timed)", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(msg, flush=True)

    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(a.threads)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    a.artifacts_dir.mkdir(parents=True, exist_ok=True)
    rc = ["--recompute-attention"] if a.recompute_attention else []
    tag = "-rc" if a.recompute_attention else ""
    full, lora = a.artifacts_dir / f"{a.config}{tag}", a.artifacts_dir / f"{a.config}-lora-r{a.rank}{tag}"
    _build(a.config, full, env, a.reuse, log, rc)
    _build(a.config, lora, env, a.reuse, log, ["--lora-rank", str(a.rank), "--lora-alpha", str(a.alpha),
                                               "--lora-targets", a.targets, *rc])
    case = SimpleNamespace(batch=a.batch, seq=a.seq)
    plan = [("full", "ort", full), ("lora", "ort", lora), ("peft", "peft", lora)]
    times: dict[str, list[float]] = {label: [] for label, _, _ in plan}
    losses: dict[str, list[float]] = {label: [] for label, _, _ in plan}
    peaks: dict[str, float] = {label: 0.0 for label, _, _ in plan}
    def burst(label: str, w: Worker, r: int) -> None:
        for i in range(a.burst):
            got = w.step()
            if got is None:
                raise SystemExit(f"{label}: {w.error}")
            if i:  # the first step of a burst re-warms and is not timed
                times[label].append(got[0])
            losses[label].append(got[1])
            peaks[label] = max(peaks[label], _vm_hwm_mib(w.proc.pid) or 0.0)
        log(f"round {r + 1}: {label} {statistics.median(times[label][-(a.burst - 1):]) / 1e3:.2f} s/step, "
            f"peak RSS {peaks[label]:,.0f} MiB (load {os.getloadavg()[0]:.1f})")

    def start(label: str, kind: str, folder: Path) -> Worker:
        w = Worker(kind, case, folder, a.threads, "cpu", env)
        if not w.wait_ready():
            raise SystemExit(f"{label}: {w.error}")
        return w

    def stop(label: str, w: Worker) -> None:
        w.close()
        peaks[label] = max(peaks[label], w.final.get("peak_rss_mb") or 0.0)

    if a.sequential:  # one process alive at a time: a fresh one per participant and round
        for r in range(a.rounds):
            for label, kind, folder in plan:
                w = start(label, kind, folder)
                burst(label, w, r)
                stop(label, w)
    else:  # all alive, bursts in turn: the machine's drift hits every participant alike
        workers = {label: start(label, kind, folder) for label, kind, folder in plan}
        try:
            for r in range(a.rounds):
                for label, w in workers.items():
                    burst(label, w, r)
        finally:
            for label, w in workers.items():
                stop(label, w)
    res = {label: {"median_s": statistics.median(times[label]) / 1e3, "steps_s": [t / 1e3 for t in times[label]],
                   "peak_rss_mib": peaks[label], "losses": losses[label]} for label in times}
    res["full"]["checkpoint_bytes"] = _checkpoint_bytes(full, a.threads)
    res["lora"]["checkpoint_bytes"] = _checkpoint_bytes(lora, a.threads)
    out = {"config": a.config, "batch": a.batch, "seq": a.seq, "rank": a.rank, "alpha": a.alpha,
           "recompute_attention": a.recompute_attention,
           "targets": a.targets.split(","), "threads": a.threads, "loadavg_end": list(os.getloadavg()),
           "participants": res,
           "ratios": {"lora_vs_full_time": res["lora"]["median_s"] / res["full"]["median_s"],
                      "lora_vs_full_peak_rss": res["lora"]["peak_rss_mib"] / res["full"]["peak_rss_mib"],
                      "lora_vs_full_checkpoint": res["lora"]["checkpoint_bytes"] / res["full"]["checkpoint_bytes"],
                      "lora_vs_peft_time": res["lora"]["median_s"] / res["peft"]["median_s"],
                      "lora_vs_peft_peak_rss": res["lora"]["peak_rss_mib"] / res["peft"]["peak_rss_mib"]},
           "created_unix": int(time.time())}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(out, indent=1) + "\n")
    log(f"\n{a.config} {a.batch}x{a.seq}, rank {a.rank} on {a.targets}, {a.threads} threads"
        + (", attention recomputed" if a.recompute_attention else "") + ":")
    for label in ("full", "lora", "peft"):
        r = res[label]
        ck = f", checkpoint {r['checkpoint_bytes'] / 2**20:,.1f} MiB" if "checkpoint_bytes" in r else ""
        log(f"  {label:5s} {r['median_s']:.2f} s/step (of {', '.join(f'{t:.2f}' for t in r['steps_s'])}), "
            f"peak RSS {r['peak_rss_mib']:,.0f} MiB{ck}")
    q = out["ratios"]
    log(f"  LoRA/full: time {q['lora_vs_full_time']:.2f}x, peak RSS {q['lora_vs_full_peak_rss']:.2f}x, "
        f"checkpoint {q['lora_vs_full_checkpoint']:.2%}; LoRA/PEFT: time {q['lora_vs_peft_time']:.2f}x, "
        f"peak RSS {q['lora_vs_peft_peak_rss']:.2f}x")
    log(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
