"""``make bench``: full training steps on each runtime against PyTorch eager, in one run.

    python -m bench.run [--quick] [--configs small,mid,gpt2] [--threads N]
                        [--device cpu|cuda] [--json PATH] [--runtimes ...] [--reuse]
                        [--rounds N] [--burst K]

For each case (config, batch x T) it starts one process per participant
(bench/worker.py): the ``ort``, ``ort-training`` and ``openvino`` runtimes, ``ort-split``
(the ``ort`` runtime through grad_step.onnx + apply_step.onnx, the path of gradient
accumulation and data parallel, on the same whole batch), ``ort-lora`` (the ``ort``
runtime on a LoRA folder of the same model: rank-8 adapters on every target, the
model frozen, built beside the plain folder), the batched
PyTorch eager model (bench/torch_model.py; ``torch`` with an explicit masked
softmax, ``torch-sdpa`` with scaled_dot_product_attention) and a NumPy sgemm
probe. It then runs warm-up steps and alternates short bursts of steps across
the processes (the order rotating every round), so machine drift hits all
participants alike. Within a burst the steps run back to back, as in training;
the first step of each burst is a re-warm and is recorded but not timed (the
neighbour that just ran leaves the caches cold and its threads possibly still
spinning; on small 1x256 re-warm steps measured 1.6x the back-to-back median
for ``ort`` and 1.3x for PyTorch). Long steps (gpt2) run bursts of one, all
timed, and one participant at a time (a process alive only for its own steps):
seven gpt2 processes at once outgrow a 24 GiB machine. Per participant: median ms per full step
(forward, loss, backward, AdamW), tokens/s, model GFLOP/s, the percentage of
the sgemm rate measured in the same rounds, and peak RSS (the process's
getrusage maxrss: imports, model, optimizer state, allocator arenas; each
participant in its own process). Before timing, the batched PyTorch model's
loss at init is checked against the test oracle's (tests/oracle/torch_gpt2.py),
and every participant's first-step loss against the others'.

Model FLOPs per step (the usual estimate; dense attention, no causal halving):
    6 * N * B*T  +  12 * L * B * T^2 * d  +  6 * B*T * d * V
N = non-embedding parameters (everything but wte and wpe), L layers, d d_model,
V vocab: matmul FLOPs of forward + backward (2x forward), the attention
score/value products, and the tied logits.

It also times ``python -m graphgen build`` per config (wall seconds, peak RSS
of the build process). Output: a table on stdout and a JSON file.

Fairness notes. Every participant gets the same thread count (--threads, default
all cores; OMP/OpenBLAS/MKL variables set to it, ORT's intra-op threads,
torch.set_num_threads). PyTorch runs eager, float32, with torch.optim.AdamW
(foreach=True). The ORT workers block ``import torch``: onnxruntime-training's
``import onnxruntime`` imports torch when it is installed (to probe ORTModule),
about 250 MiB of RSS the runtimes never use and that an environment without
torch does not pay. Step losses are computed on the same fixed random batches
(bench/worker.py) from the artifacts' initial weights in every participant.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name: (vocab, context, d_model, n_heads, d_ff, n_layers) -- graphgen's presets, repeated here
# so that the driver needs no graphgen import (checked against the manifest after the build).
CONFIGS = {
    "small": (256, 256, 256, 8, 1024, 4),
    "mid": (8192, 256, 512, 8, 2048, 6),
    "gpt2": (50257, 1024, 768, 12, 3072, 12),
    "tiny": (256, 64, 64, 4, 256, 2),  # for the smoke test only (--configs tiny)
}


@dataclass(frozen=True)
class Case:
    config: str
    batch: int
    seq: int
    rounds: int  # bursts per participant
    warmup: int
    burst: int = 3  # steps per burst; with burst > 1 the first of each is a re-warm, not timed
    sequential: bool = False  # one participant process alive at a time (memory), not taking turns

    @property
    def steps(self) -> int:
        """Timed steps per participant."""
        return self.rounds * (self.burst - 1 if self.burst > 1 else 1)

    @property
    def label(self) -> str:
        return f"{self.config} {self.batch}x{self.seq}"


CASES = [
    Case("small", 1, 256, 8, 2),
    Case("mid", 1, 256, 5, 2),
    Case("mid", 8, 256, 4, 1, burst=2),
    Case("gpt2", 1, 1024, 3, 1, burst=1, sequential=True),
]
QUICK_CASES = [Case("small", 1, 256, 6, 2)]
# On a GPU a step takes milliseconds: larger batches, longer bursts.
CUDA_CASES = [Case("small", 8, 256, 6, 3, burst=6), Case("mid", 8, 256, 6, 3, burst=6),
              Case("gpt2", 8, 1024, 6, 2, burst=4)]
EXTRA_CASES = [Case("tiny", 1, 64, 2, 1)]  # selected only by name
RUNTIMES = ("ort", "ort-split", "ort-lora", "ort-training", "openvino", "torch", "torch-sdpa")
# ort-lora: the `ort` runtime on a LoRA folder of the same model (adapters of this rank on
# every target, the model frozen): what a LoRA step costs next to a full one.
LORA_RANK = 8
BASELINE = "torch"

# The targets: (case label, runtime) -> minimum tokens/s ratio to the baseline.
SPEED_TARGETS = {"small 1x256": 1.5, "mid 1x256": 1.3, "mid 8x256": 1.3, "gpt2 1x1024": 1.7}
SGEMM_TARGET = ("mid 8x256", 65.0)  # percent of the measured sgemm rate
RSS_TARGET = 0.8  # peak RSS at most this fraction of the baseline's
BUILD_TARGET = ("gpt2", 60.0, 4.0)  # seconds, GiB


def model_flops(cfg: tuple, batch: int, seq: int) -> tuple[float, dict]:
    vocab, context, d, h, f, n_layers = cfg
    per_layer = 2 * d + 3 * (d * d + d) + d * d + d + 2 * d + f * d + f + d * f + d  # ln1, qkv, o, ln2, fc, proj
    n_nonembed = n_layers * per_layer + 2 * d
    tokens = batch * seq
    dense = 6 * n_nonembed * tokens
    attn = 12 * n_layers * batch * seq * seq * d
    logits = 6 * tokens * d * vocab
    return float(dense + attn + logits), {"non_embedding_params": n_nonembed, "dense": dense,
                                          "attention": attn, "tied_logits": logits}


def machine_info(threads: int) -> dict:
    cpu = platform.processor()
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not cpu.strip():
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    from importlib import metadata

    for dist in ("onnxruntime", "onnxruntime-training-cpu", "onnxruntime-training", "onnxruntime-gpu",
                 "openvino", "torch", "numpy", "onnx"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        pass
    return {
        "cpu": cpu or platform.machine(),
        "cores": os.cpu_count(),
        "threads": threads,
        "avx512": " avx512f" in flags,
        "memory_gib": round(mem, 1) if mem else None,
        "platform": platform.platform(),
        "versions": versions,
        "loadavg_start": list(os.getloadavg()),
    }


# --------------------------------------------------------------------------- builds


def folder_name(config: str, recompute: bool, lora: bool = False) -> str:
    return config + (f"-lora-r{LORA_RANK}" if lora else "") + ("-recompute" if recompute else "")


def _run_measured(cmd: list[str], env: dict, log) -> tuple[int, float, float, str]:
    """Run ``cmd``; returns (exit code, wall seconds, peak RSS GiB of the child, output tail)."""
    t = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t
        out.seek(0)
        tail = out.read().decode(errors="replace")[-3000:]
    return proc.returncode, wall, usage.ru_maxrss / 2**20, tail


def build(config: str, folder: Path, env: dict, reuse: bool, log, recompute: bool = False, lora: bool = False) -> dict:
    if reuse and (folder / "manifest.json").is_file():
        manifest = json.loads((folder / "manifest.json").read_text())
        from graphgen.recompute import default_recompute

        want = ["attention"] if recompute else default_recompute(manifest["config"]["context"])
        if (manifest.get("name") == config and manifest["config"].get("labels") == "index"
                and manifest["train_step"].get("recompute") == want
                and (manifest.get("lora") or {}).get("rank") == (LORA_RANK if lora else None)):
            log(f"build {config}: reusing {folder} (not timed)")
            return {"config": config, "reused": True, "folder": str(folder)}
    log(f"build {config} -> {folder} ...")
    cmd = [sys.executable, "-m", "graphgen", "build", "--config", config, "--out", str(folder)]
    if recompute:
        cmd.append("--recompute-attention")
    if lora:
        cmd += ["--lora-rank", str(LORA_RANK)]
    rc, wall, rss, tail = _run_measured(cmd, env, log)
    if rc != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed (exit {rc}):\n{tail}")
    size = sum(p.stat().st_size for p in folder.iterdir())
    log(f"build {folder.name}: {wall:.1f} s, peak RSS {rss:.2f} GiB, {size / 2**20:.0f} MiB on disk")
    return {"config": config, "reused": False, "folder": str(folder), "seconds": wall, "peak_rss_gib": rss,
            "bytes": size, "command": " ".join(cmd[1:])}


# --------------------------------------------------------------------------- workers


class Worker:
    def __init__(self, kind: str, case: Case, folder: Path, threads: int, device: str, env: dict,
                 label: str | None = None):
        self.kind = label or kind  # the participant's name in the results
        cmd = [sys.executable, "-m", "bench.worker", "--kind", kind, "--artifacts", str(folder),
               "--batch", str(case.batch), "--seq", str(case.seq), "--threads", str(threads), "--device", device]
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, bufsize=1)
        self.times: list[float] = []
        self.rewarm: list[float] = []  # the untimed first step of each burst
        self.losses: list[float] = []
        self.error: str | None = None
        self.ready: dict = {}
        self.final: dict = {}

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.stderr.seek(0)
            tail = self.stderr.read().decode(errors="replace")[-2000:]
            return {"error": f"worker exited (code {self.proc.returncode}) without answering:\n{tail}"}
        return json.loads(line)

    def wait_ready(self) -> bool:
        self.ready = self._read()
        if not self.ready.get("ready"):
            self.error = self.ready.get("error", "not ready")
            self.close()
            return False
        return True

    def step(self) -> float | None:
        if self.error:
            return None
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        r = self._read()
        if "error" in r:
            self.error = r["error"]
            self.close()
            return None
        return r["ms"], r["loss"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.final = self._read()
            except (BrokenPipeError, ValueError):
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


def run_case(case: Case, folder: Path, runtimes: list[str], threads: int, device: str, env: dict, log,
             lora_folder: Path | None = None) -> dict:
    cfg = CONFIGS[case.config]
    flops, parts = model_flops(cfg, case.batch, case.seq)
    tokens = case.batch * case.seq
    result = {"case": case.label, "config": case.config, "batch": case.batch, "seq": case.seq,
              "tokens_per_step": tokens, "flops_per_step": flops, "flops_parts": parts,
              "timed_steps": case.steps, "warmup_steps": case.warmup, "participants": {}}

    # correctness gate: the batched baseline against the test oracle, at init, on batch 0
    if any(r.startswith("torch") for r in runtimes):
        chk = Worker("check", case, folder, threads, "cpu", env)
        ok = chk.wait_ready()
        chk.close()
        if not ok:
            raise SystemExit(f"{case.label}: oracle check failed: {chk.error}")
        losses = chk.ready["losses"]
        worst = max(abs(losses[k] - losses["oracle"]) / abs(losses["oracle"]) for k in ("torch", "torch-sdpa"))
        result["oracle_check"] = {"losses": losses, "max_rel_diff": worst}
        log(f"{case.label}: loss at init, oracle {losses['oracle']:.6f}, batched torch {losses['torch']:.6f}, "
            f"sdpa {losses['torch-sdpa']:.6f} (max rel diff {worst:.1e})")
        if worst > 1e-4:
            raise SystemExit(f"{case.label}: the batched PyTorch model disagrees with the oracle: {losses}")

    def start(kind: str) -> Worker | None:
        if kind == "ort-lora":
            w = Worker("ort", case, lora_folder, threads, device, env, label=kind)
        else:
            w = Worker(kind, case, folder, threads, device if kind != "sgemm" else "cpu", env)
        if w.wait_ready():
            log(f"{case.label}: {kind} ready ({w.ready['load_s']:.1f} s, RSS {w.ready['rss_mb']:.0f} MiB)")
            return w
        log(f"{case.label}: {kind} unavailable: {w.error.strip().splitlines()[-1] if w.error else '?'}")
        result["participants"][kind] = {"error": w.error}
        return None

    # the sgemm probe measures the CPU: no yardstick for a GPU run
    kinds = list(runtimes) + (["sgemm"] if device == "cpu" else [])
    # Every participant alive at once lets them take turns; a sequential case runs them one
    # at a time (gpt2's seven processes together outgrow a 24 GiB machine).
    groups = [[k] for k in kinds] if case.sequential else [kinds]
    workers: list[Worker] = []
    for group in groups:
        alive = [w for w in map(start, group) if w is not None]
        workers += alive
        try:
            for _ in range(case.warmup):
                for w in alive:
                    r = w.step()
                    if r:
                        w.losses.append(r[1])
            for rnd in range(case.rounds):
                k = rnd % len(alive) if alive else 0
                for w in alive[k:] + alive[:k]:  # rotate the order: none always runs first
                    for i in range(case.burst):
                        r = w.step()
                        if r:
                            (w.rewarm if case.burst > 1 and i == 0 else w.times).append(r[0])
                            w.losses.append(r[1])
                done = ", ".join(f"{w.kind} {w.times[-1]:.0f}" for w in alive if w.times and not w.error)
                log(f"{case.label}: round {rnd + 1}/{case.rounds}: {done} ms")
        finally:
            for w in alive:
                w.close()

    sgemm = next((w for w in workers if w.kind == "sgemm" and w.times), None)
    sgemm_gflops = 2 * 2048**3 / (statistics.median(sgemm.times) / 1e3) / 1e9 if sgemm else None
    result["sgemm"] = {"n": 2048, "median_ms": statistics.median(sgemm.times) if sgemm else None,
                       "gflops": sgemm_gflops,
                       "best_gflops": 2 * 2048**3 / (min(sgemm.times) / 1e3) / 1e9 if sgemm else None,
                       "peak_rss_mb": sgemm.final.get("peak_rss_mb") if sgemm else None}
    for w in workers:
        if w.kind == "sgemm":
            continue
        if w.error or not w.times:
            result["participants"][w.kind] = {"error": w.error or "no timed steps"}
            log(f"{case.label}: {w.kind} failed: {w.error}")
            continue
        med = statistics.median(w.times)
        gflops = flops / (med / 1e3) / 1e9
        result["participants"][w.kind] = {
            "median_ms": med,
            "min_ms": min(w.times),
            "max_ms": max(w.times),
            "times_ms": w.times,
            "rewarm_ms": w.rewarm,  # first step of each burst, not timed
            "tokens_per_s": tokens / (med / 1e3),
            "gflops": gflops,
            "pct_sgemm": 100 * gflops / sgemm_gflops if sgemm_gflops else None,
            "peak_rss_mb": w.final.get("peak_rss_mb"),
            "rss_after_mb": w.final.get("rss_mb"),
            "load_s": w.ready.get("load_s"),
            "first_loss": w.losses[0] if w.losses else None,
            "last_loss": w.losses[-1] if w.losses else None,
        }
    base = result["participants"].get(BASELINE, {})
    firsts = {k: v["first_loss"] for k, v in result["participants"].items() if v.get("first_loss") is not None}
    if firsts:
        ref = next(iter(firsts.values()))
        result["first_loss_max_rel_diff"] = max(abs(x - ref) / abs(ref) for x in firsts.values())
    for kind, p in result["participants"].items():
        if "median_ms" in p and "median_ms" in base:
            p["speed_vs_torch"] = p["tokens_per_s"] / base["tokens_per_s"]
            if p.get("peak_rss_mb") and base.get("peak_rss_mb"):
                p["rss_vs_torch"] = p["peak_rss_mb"] / base["peak_rss_mb"]
    return result


# --------------------------------------------------------------------------- report


def table(results: list[dict], builds: list[dict], machine: dict) -> str:
    lines = [f"machine: {machine['cpu']}, {machine['cores']} cores{' (AVX-512)' if machine['avx512'] else ''}, "
             f"{machine['threads']} threads, load avg at start {machine['loadavg_start'][0]:.2f}; "
             + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if k != "python"),
             ""]
    hdr = ("case", "runtime", "ms/step", "tokens/s", "vs torch", "GFLOP/s", "% sgemm", "peak RSS MiB", "RSS vs torch")
    rows = []
    for r in results:
        for kind, p in r["participants"].items():
            if "median_ms" not in p:
                rows.append((r["case"], kind, "error", "", "", "", "", "", ""))
                continue
            rows.append((
                r["case"], kind, f"{p['median_ms']:,.1f}", f"{p['tokens_per_s']:,.0f}",
                f"{p['speed_vs_torch']:.2f}x" if "speed_vs_torch" in p else "",
                f"{p['gflops']:.1f}", f"{p['pct_sgemm']:.0f}%" if p.get("pct_sgemm") else "",
                f"{p['peak_rss_mb']:,.0f}" if p.get("peak_rss_mb") else "",
                f"{p['rss_vs_torch']:.2f}x" if "rss_vs_torch" in p else "",
            ))
        if r["sgemm"]["gflops"]:
            rows.append((r["case"], "numpy sgemm 2048^3", f"{r['sgemm']['median_ms']:.1f}", "", "",
                         f"{r['sgemm']['gflops']:.1f}", "100%", "", ""))
    widths = [max(len(str(x)) for x in col) for col in zip(hdr, *rows)]
    fmt = lambda row: "  ".join(str(x).rjust(w) if i >= 2 else str(x).ljust(w) for i, (x, w) in enumerate(zip(row, widths)))  # noqa: E731
    lines.append(fmt(hdr))
    lines.append(fmt(["-" * w for w in widths]))
    prev = None
    for row in rows:
        if prev is not None and row[0] != prev:
            lines.append("")
        lines.append(fmt(row))
        prev = row[0]
    timed = [b for b in builds if not b.get("reused")]
    if timed:
        lines.append("")
        lines += [f"build {b['config']}: {b['seconds']:.1f} s, peak RSS {b['peak_rss_gib']:.2f} GiB, "
                  f"{b['bytes'] / 2**20:,.0f} MiB of artifacts" for b in timed]
    return "\n".join(lines)


def check_targets(results: list[dict], builds: list[dict]) -> list[dict]:
    out = []
    by_case = {r["case"]: r for r in results}
    for case, need in SPEED_TARGETS.items():
        p = by_case.get(case, {}).get("participants", {}).get("ort", {})
        if "speed_vs_torch" in p:
            out.append({"target": f"{case}: ort tokens/s >= {need}x torch", "value": p["speed_vs_torch"],
                        "met": p["speed_vs_torch"] >= need})
    case, pct = SGEMM_TARGET
    p = by_case.get(case, {}).get("participants", {}).get("ort", {})
    if p.get("pct_sgemm") is not None:
        out.append({"target": f"{case}: ort >= {pct:.0f}% of sgemm", "value": p["pct_sgemm"], "met": p["pct_sgemm"] >= pct})
    for r in results:
        for kind in ("ort", "ort-training"):
            p = r["participants"].get(kind, {})
            if "rss_vs_torch" in p:
                out.append({"target": f"{r['case']}: {kind} peak RSS <= {RSS_TARGET}x torch", "value": p["rss_vs_torch"],
                            "met": p["rss_vs_torch"] <= RSS_TARGET})
    name, secs, gib = BUILD_TARGET
    for b in builds:
        if b["config"] == name and not b.get("reused"):
            out.append({"target": f"build {name}: <= {secs:.0f} s and <= {gib:.0f} GiB",
                        "value": [b["seconds"], b["peak_rss_gib"]],
                        "met": b["seconds"] <= secs and b["peak_rss_gib"] <= gib})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small 1x256 only (under two minutes)")
    p.add_argument("--configs", help="comma-separated subset of small,mid,gpt2 (default: all; tiny: smoke test)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for every participant (default: all cores)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--json", type=Path, default=Path("runs/bench.json"), help="where to write the results (default runs/bench.json)")
    p.add_argument("--runtimes", default=",".join(RUNTIMES), help=f"participants (default {','.join(RUNTIMES)})")
    p.add_argument("--artifacts-dir", type=Path, default=Path(tempfile.gettempdir()) / "gpt2-onnx-bench",
                   help="where the benchmark builds its artifact folders (default: $TMPDIR/gpt2-onnx-bench)")
    p.add_argument("--recompute-attention", action="store_true",
                   help="build the step graphs with graphgen build --recompute-attention at every size (default: "
                        "graphgen's auto, which recomputes attention and GELU outputs from a context of 1,024 up)")
    p.add_argument("--reuse", action="store_true", help="reuse artifact folders already built there (build not timed)")
    p.add_argument("--rounds", type=int, help="bursts per participant (default: per case)")
    p.add_argument("--burst", type=int, help="steps per burst, the first a re-warm when > 1 (default: per case)")
    a = p.parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if a.threads < 1:
        p.error("--threads must be >= 1")
    for flag, value in (("--rounds", a.rounds), ("--burst", a.burst)):
        if value is not None and value < 1:
            p.error(f"{flag} must be >= 1")
    runtimes = [r for r in a.runtimes.split(",") if r]
    bad = [r for r in runtimes if r not in RUNTIMES]
    if bad:
        p.error(f"unknown runtimes {bad}; choose from {RUNTIMES}")
    cases = CUDA_CASES if a.device == "cuda" else QUICK_CASES if a.quick else CASES
    if a.configs:
        wanted = a.configs.split(",")
        unknown = [c for c in wanted if c not in CONFIGS]
        if unknown:
            p.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
        cases = [c for c in (cases + EXTRA_CASES) if c.config in wanted]
    if a.rounds is not None or a.burst is not None:
        cases = [Case(c.config, c.batch, c.seq, a.rounds or c.rounds, c.warmup, a.burst or c.burst, c.sequential)
                 for c in cases]

    if a.device == "cuda":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            print("bench: --device cuda skipped: this onnxruntime has no CUDAExecutionProvider "
                  f"(available: {onnxruntime.get_available_providers()})")
            return 0

    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(a.threads)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")

    machine = machine_info(a.threads)
    builds, results = [], []
    for config in dict.fromkeys(c.config for c in cases):
        builds.append(build(config, a.artifacts_dir / folder_name(config, a.recompute_attention), env, a.reuse, log,
                            a.recompute_attention))
        if "ort-lora" in runtimes:
            build(config, a.artifacts_dir / folder_name(config, a.recompute_attention, lora=True), env, a.reuse, log,
                  a.recompute_attention, lora=True)
    for case in cases:
        folder = a.artifacts_dir / folder_name(case.config, a.recompute_attention)
        manifest = json.loads((folder / "manifest.json").read_text())
        got = tuple(manifest["config"][k] for k in ("vocab", "context", "d_model", "n_heads", "d_ff", "n_layers"))
        if got != CONFIGS[case.config]:
            raise SystemExit(f"{folder} holds {got}, not the {case.config} preset {CONFIGS[case.config]}")
        results.append(run_case(case, folder, runtimes, a.threads, a.device, env, log,
                                a.artifacts_dir / folder_name(case.config, a.recompute_attention, lora=True)))
    machine["loadavg_end"] = list(os.getloadavg())
    targets = check_targets(results, builds)
    report = {"machine": machine, "device": a.device, "baseline": BASELINE,
              "method": "one process per participant; warm-up steps, then bursts of back-to-back steps "
                        "alternated across processes with a rotating order, the first step of each burst "
                        "(when a burst has more than one) a re-warm not timed; medians; peak RSS = each "
                        "process's ru_maxrss "
                        "(ORT workers run with `import torch` blocked); sgemm = numpy float32 2048^3 matmul "
                        "timed in the same rounds (median)",
              "flop_formula": "6*N_nonembed*B*T + 12*L*B*T^2*d + 6*B*T*d*V",
              "builds": builds, "results": results, "targets": targets}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(report, indent=1))
    print(table(results, builds, machine))
    if targets:
        print()
        for t in targets:
            v = t["value"]
            vs = f"{v:.2f}" if isinstance(v, float) else ", ".join(f"{x:.2f}" for x in v)
            print(f"{'met   ' if t['met'] else 'MISSED'}  {t['target']}  (measured {vs})")
    for r in results:
        if r.get("first_loss_max_rel_diff", 0) > 1e-4:
            print(f"WARNING {r['case']}: first-step losses differ across participants by "
                  f"{r['first_loss_max_rel_diff']:.1e} (relative)")
    print(f"\nresults: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
