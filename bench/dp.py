"""Data parallel on one machine: N ranks x 1 thread against 1 process x N threads.

    python -m bench.dp [--config mid] [--batch 8] [--seq 256] [--steps 4] [--np 2] [--json PATH]

Builds the config's artifacts (or takes --artifacts), then runs, each in its own
process(es), the same global batches (fixed random tokens) from the initial weights:

  single    1 process x N threads, train_step.onnx (what a one-machine run does)
  split     1 process x N threads, grad_step.onnx + apply_step.onnx (the data-parallel path at N = 1)
  dp        mpiexec -n N, 1 thread each, --data-parallel over shared memory (Open MPI's default)
  zero      the same with --shard-optimizer
  dp-tcp    dp over TCP on the loopback (--mca btl tcp,self): the bytes on the wire are counted
  zero-tcp  zero over TCP

Per run: median step time of the steps after the first (over --rounds, rotated, with the
range), tokens/s, where a rank's step time goes (grad_step, the gradient Allreduce,
apply_step and, under zero, the parameter broadcast: runtimes/distributed.py), per-rank
peak RSS (getrusage maxrss: model, sessions, optimizer state; no checkpoint is written),
and for the TCP runs the loopback's transmitted bytes per step and rank (/proc/net/dev;
TCP/IP headers included, other traffic on the loopback too: a floor of noise) against
the theoretical 2(N-1)/N x gradient bytes of a ring Allreduce. Every run's losses are
checked against single's (1e-5 relative). The machine is shared: run it more than once.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MPI_ROOT_FLAGS = ["--allow-run-as-root", "--oversubscribe", "--bind-to", "none"]


def _loopback_tx() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[8])
    return 0


def _batches(cfg: dict, steps: int, batch: int, seq: int):
    import numpy as np

    rng = np.random.default_rng(7)
    out = []
    for _ in range(steps):
        tok = rng.integers(0, cfg["vocab"], (batch, seq + 1), dtype=np.int64)
        pos = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
        out.append((tok[:, :-1].copy(), pos, tok[:, 1:].copy()))
    return out


def worker(a) -> None:
    """One process of a run; prints one JSON line (rank 0 for all ranks)."""
    sys.modules.setdefault("torch", None)  # as bench/worker.py: the training wheel's import would pull it in
    import numpy as np

    import runtimes
    from contract.hp import make_hp

    world = None
    if a.mode in ("dp", "zero"):
        from runtimes.distributed import DataParallel, join

        world = join()
    rt = runtimes.load(a.artifacts, runtime="ort", threads=a.threads)
    if world is not None:
        rt = DataParallel(rt, world, shard_optimizer=a.mode == "zero")
    cfg = rt.art.config
    batches = _batches(cfg, a.steps, a.batch, a.seq)
    times, losses, phases, tx = [], [], [], []
    clip = np.array(1.0, np.float32)
    for t, batch in enumerate(batches, 1):
        hp = make_hp(1e-3, cfg["beta1"], cfg["beta2"], cfg["eps"], cfg["weight_decay"], step=t)
        before = dict(rt.seconds) if world else {}
        if world:
            world.barrier()
        x0, t0 = _loopback_tx(), time.perf_counter()
        if a.mode == "single":
            loss = rt.step(*batch, hp, clip)
        elif a.mode == "split":  # the hooks step_accumulated runs, timed apart
            loss, grads = rt._micro_gradients(*batch)
            t1 = time.perf_counter()
            rt._apply_gradients(grads, hp, clip)
            rt.step_count += 1
            phases.append({"grad": t1 - t0, "apply": time.perf_counter() - t1})
        else:
            loss = rt.step_accumulated(list(zip(*(np.split(x, world.size) for x in batch))), hp, clip)
        if world:
            world.barrier()
            phases.append({k: v - before[k] for k, v in rt.seconds.items()})
        times.append(time.perf_counter() - t0)
        tx.append(_loopback_tx() - x0)
        losses.append(loss)
    row = {"mode": a.mode, "times": times, "losses": losses, "phases": phases, "tx": tx,
           "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "grad_bytes": 4 * sum(int(np.prod(s)) for s in rt.art.param_shapes.values())}
    if world is None:
        print(json.dumps({**row, "ranks": [row["rss_mb"]]}))
        return
    rss = world.comm.gather(row["rss_mb"], root=0)
    if world.rank == 0:
        print(json.dumps({**row, "ranks": rss, "size": world.size}))


def _run(cmd: list[str], env: dict) -> dict:
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return json.loads(lines[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.dp")
    ap.add_argument("--config", default="mid")
    ap.add_argument("--artifacts", default=None, help="an artifact folder (default: built into a temporary folder)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4, help="steps per run; the first is not timed")
    ap.add_argument("--np", type=int, default=2, help="ranks (and the single process's threads)")
    ap.add_argument("--modes", default="single,split,dp,zero,dp-tcp,zero-tcp")
    ap.add_argument("--rounds", type=int, default=1, help="repeat every run, in a rotated order; medians and ranges")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        a.mode = a.worker
        worker(a)
        return 0
    if a.batch % a.np or a.steps < 2:
        raise SystemExit("--batch must be divisible by --np, and --steps at least 2")
    tmp = None
    if a.artifacts is None:
        tmp = tempfile.mkdtemp(prefix="bench-dp-")
        a.artifacts = str(Path(tmp) / a.config)
        subprocess.run([sys.executable, "-m", "graphgen", "build", "--config", a.config, "--out", a.artifacts],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    common = ["-m", "bench.dp", "--artifacts", a.artifacts, "--batch", str(a.batch), "--seq", str(a.seq),
              "--steps", str(a.steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    modes = a.modes.split(",")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    try:
        for r in range(a.rounds):
            for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
                base = mode.removesuffix("-tcp")
                if base in ("single", "split"):
                    cmd = [sys.executable, *common, "--worker", base, "--threads", str(a.np)]
                else:
                    net = (["--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", "lo"]
                           if mode.endswith("-tcp") else [])
                    cmd = [mpiexec, "-n", str(a.np), *MPI_ROOT_FLAGS, *net, sys.executable, *common, "--worker",
                           base, "--threads", "1"]
                runs[mode].append(_run(cmd, env))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    ref = runs[modes[0]][0]["losses"]
    tokens, n = a.batch * a.seq, a.np
    print(f"{a.config} {a.batch}x{a.seq}: {n} ranks x 1 thread vs 1 process x {n} threads; {a.steps - 1} timed steps "
          f"x {a.rounds} round(s); gradient {runs[modes[0]][0]['grad_bytes'] / 2**20:.1f} MiB. Medians, [min-max] "
          f"over rounds")
    print(f"{'run':<9} {'ms/step':>16} {'tokens/s':>16} {'grad':>6} {'allred.':>7} {'apply':>6} {'bcast':>6} "
          f"{'wire MiB/rank':>13} {'theory':>6} {'peak RSS MiB/rank':>18}")
    med = statistics.median
    summary = {}
    for mode in modes:
        per_round = []
        for r in runs[mode]:
            bad = [(x, y) for x, y in zip(r["losses"], ref) if abs(x - y) > 1e-5 * abs(y)]
            if bad:
                raise SystemExit(f"{mode}: losses differ from {modes[0]}'s: {bad}")
            per_round.append(med(r["times"][1:]))
        phases = {k: 1e3 * med([p[k] for r in runs[mode] for p in r["phases"][1:]])
                  for k in ("grad", "allreduce", "apply", "broadcast") if runs[mode][0]["phases"]
                  and k in runs[mode][0]["phases"][0]}
        wire = (med([x for r in runs[mode] for x in r["tx"][1:]]) / n / 2**20) if mode.endswith("-tcp") else None
        theory = 2 * (n - 1) / n * runs[mode][0]["grad_bytes"] / 2**20
        rss = [max(r["ranks"][i] for r in runs[mode]) for i in range(len(runs[mode][0]["ranks"]))]
        step = med(per_round)
        summary[mode] = {"ms_per_step": 1e3 * step, "ms_range": [1e3 * min(per_round), 1e3 * max(per_round)],
                         "tokens_per_s": tokens / step, "phases_ms": phases, "wire_mib_per_rank": wire,
                         "theory_mib_per_rank": theory, "peak_rss_mib": rss}
        span = f"{1e3 * step:.0f} [{1e3 * min(per_round):.0f}-{1e3 * max(per_round):.0f}]"
        tps = f"{tokens / step:.0f} [{tokens / max(per_round):.0f}-{tokens / min(per_round):.0f}]"
        ph = " ".join(f"{phases[k]:>6.0f}" if k in phases else f"{'':>6}" for k in ("grad", "allreduce", "apply",
                                                                                    "broadcast"))
        print(f"{mode:<9} {span:>16} {tps:>16} {ph.replace('  ', ' ', 0)} "
              f"{'' if wire is None else format(wire, '.1f'):>13} {format(theory, '.1f') if wire else '':>6} "
              f"{' / '.join(f'{x:.0f}' for x in rss):>18}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "summary": summary, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
