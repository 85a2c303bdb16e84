"""Load: 10,000 steps on tiny with a checkpoint every 500, memory and file descriptors flat.

Marked ``soak``: not in the default suite (pyproject deselects it); run it with
``make soak`` (``pytest -m soak -s tests/test_soak.py``). It trains through the
real CLI in a child process and samples the child's resident set size
(/proc/PID/status VmRSS) and open file descriptors (/proc/PID/fd) about ten
times a second, keyed by the step the child has logged. Warm-up is the first
1,000 steps (two checkpoints, so every code path has run). Asserted:

- peak RSS after warm-up is at most 5% above the peak during steps 1,000-2,000;
- open file descriptors: the fewest open in the last 1,000 steps is no more than
  the fewest in steps 1,000-2,000 (a descriptor leaked per checkpoint would add
  18), and no sample after warm-up exceeds the baseline's most by more than 2
  (a save in flight holds its temporary file and the folder open);
- the run finishes, its last checkpoint is at step 10,000 and loads.

The figures are printed (run with -s) for the README. Samples taken after step
10,000 is logged (weights export, the loss plot: matplotlib is imported there,
once) are reported but not part of the comparison.

Environment: SOAK_RUNTIME (default ort, the fastest per tiny step), SOAK_STEPS
(default 10000).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtimes.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
STEPS = int(os.environ.get("SOAK_STEPS", "10000"))
RUNTIME = os.environ.get("SOAK_RUNTIME", "ort")
WARMUP = STEPS // 10
BASELINE_END = 2 * STEPS // 10


def _rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def _logged_step(log: Path) -> int:
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.path.getsize(log) - 400))
            lines = [ln for ln in f.read().splitlines() if ln.strip()]
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError, IndexError):
        return 0


@pytest.mark.soak
def test_soak_memory_and_descriptors_are_flat(tiny_index, tmp_path):
    out = tmp_path / "soak"
    data = tmp_path / "corpus.txt"
    data.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(20000)))
    cmd = [sys.executable, "-m", "runtimes", "train", "--artifacts", str(tiny_index), "--runtime", RUNTIME,
           "--data", str(data), "--out", str(out), "--steps", str(STEPS), "--batch", "4", "--seq", "64",
           "--checkpoint-every", "500", "--eval-every", "500", "--eval-batches", "2", "--sample-bytes", "0",
           "--no-progress"]
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples: list[tuple[int, int, int]] = []  # (step, rss KiB, fds)
    while p.poll() is None:
        step = _logged_step(out / "log.jsonl")
        rss, fds = _rss_kib(p.pid), _fds(p.pid)
        if rss is not None and fds is not None:
            samples.append((step, rss, fds))
        time.sleep(0.1)
    stdout, stderr = p.communicate()
    elapsed = time.time() - t0
    assert p.returncode == 0, stderr[-2000:]
    assert load_checkpoint(out / "checkpoint.safetensors").step == STEPS

    # Training only: once step STEPS is logged the run exports weights and imports matplotlib for
    # the plot (~35 MiB, once); that is the end of the run, not growth.
    training = [s for s in samples if s[0] < STEPS]
    base = [s for s in training if WARMUP <= s[0] < BASELINE_END]
    after = [s for s in training if s[0] >= WARMUP]
    late = [s for s in training if s[0] >= STEPS - STEPS // 10]
    assert base and late, f"too few samples ({len(samples)})"
    base_rss, peak_rss, late_rss = max(s[1] for s in base), max(s[1] for s in after), max(s[1] for s in late)
    base_fds, peak_fds = max(s[2] for s in base), max(s[2] for s in after)
    first_rss = max(s[1] for s in samples if s[0] < WARMUP) if any(s[0] < WARMUP for s in samples) else None
    by_k = {}
    for step, rss, _ in samples:
        by_k[step // 1000] = max(by_k.get(step // 1000, 0), rss)
    (out / "soak_samples.json").write_text(json.dumps(samples))
    print(f"\nsoak: {STEPS} steps on tiny ({RUNTIME}, batch 4x64, checkpoint every 500) in {elapsed:.0f} s; "
          f"{len(samples)} samples")
    print(f"  peak RSS: warm-up {first_rss} KiB, steps {WARMUP}-{BASELINE_END} {base_rss} KiB, "
          f"after warm-up {peak_rss} KiB ({100 * (peak_rss / base_rss - 1):+.2f}%), last 10% {late_rss} KiB")
    print("  peak RSS per 1000 steps (KiB): " + ", ".join(f"{k * 1000}: {v}" for k, v in sorted(by_k.items())))
    print(f"  whole process incl. the final export and plot: {max(s[1] for s in samples)} KiB")
    print(f"  open fds: steps {WARMUP}-{BASELINE_END} min {min(s[2] for s in base)} max {base_fds}; "
          f"after warm-up min {min(s[2] for s in after)} max {peak_fds}; last 10% min {min(s[2] for s in late)}")
    assert peak_rss <= 1.05 * base_rss, (base_rss, peak_rss)
    assert min(s[2] for s in late) <= min(s[2] for s in base), (base_fds, [s[2] for s in late][:20])
    assert peak_fds <= base_fds + 2, (base_fds, peak_fds)
