"""The training CLI under failure: exact resume, divergence, full or unwritable output, bad data.

- Resume is exact: 20 steps straight equal 10 steps, a checkpoint, and 10 more in a
  fresh process (losses and final weights bit for bit, CPU provider), for each runtime.
- Divergence: an update that turns the parameters NaN (injected: lr = NaN for one
  step, the way an overflowing gradient does it) stops the run with exit status 2
  and one line naming the last good checkpoint, whether the next loss shows it or
  the check before a checkpoint does; no checkpoint or weights are written from a
  non-finite state; ``--resume`` from the kept checkpoint then reproduces the
  straight run exactly. A real divergence (lr 1e30) does the same through the CLI.
- Output: an unwritable ``--out`` and a disk too small fail before the runtime is
  even loaded; a disk that fills during the run is a clear error and the previous
  checkpoint is intact and resumable.
- Data: an empty file, a file shorter than one sequence, a missing path: exit 2
  before anything is loaded or created.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from runtimes import base
from runtimes import train as train_mod
from runtimes.__main__ import main
from runtimes.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RUNTIMES = ["ort", "ort-training", "reference"]
STEPS = 20
TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(200))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "corpus.txt"
    p.write_text(TEXT)
    return p


def args(art: Path, data: Path, out: Path, runtime: str, *extra: str, steps: int = STEPS) -> list[str]:
    return ["train", "--artifacts", str(art), "--runtime", runtime, "--data", str(data), "--out", str(out),
            "--steps", str(steps), "--batch", "1", "--seq", "8", "--warmup", "2", "--checkpoint-every", "5",
            "--eval-every", "1000", "--eval-batches", "1", "--sample-bytes", "0", "--threads", "1",
            "--no-progress", *extra]


def run(capsys, argv) -> tuple[int, list[str]]:
    rc = main(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return rc, err


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path) -> None:
    assert losses(a) == losses(b)
    wa, wb = load_file(str(a / "weights.safetensors")), load_file(str(b / "weights.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert np.array_equal(wa[k], wb[k]), k


_straight: dict = {}


@pytest.fixture
def straight(tiny_index, data_file, tmp_path_factory):
    """The uninterrupted 20-step run per runtime (cached for the module)."""
    def get(runtime: str) -> Path:
        if runtime not in _straight:
            out = tmp_path_factory.mktemp("straight") / runtime
            assert main(args(tiny_index, data_file, out, runtime)) == 0
            assert len(losses(out)) == STEPS
            _straight[runtime] = out
        return _straight[runtime]
    return get


def fresh_process(argv: list[str]) -> subprocess.CompletedProcess:
    """``python -m runtimes ...`` in a new interpreter with this one's environment. The environment
    matters for the reference runtime: numpy's BLAS sums in an order that depends on its thread
    count (OMP_NUM_THREADS, which conftest sets before numpy loads), and --threads does not set it."""
    return subprocess.run([sys.executable, "-m", "runtimes", *argv], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ), timeout=300)


# --------------------------------------------------------------------------- exact resume
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_resume_in_a_fresh_process_is_bit_identical(tiny_index, data_file, tmp_path, straight, capsys, runtime):
    out = tmp_path / "run"
    rc, err = run(capsys, args(tiny_index, data_file, out, runtime, "--stop-after", "10"))
    assert rc == 0, err
    ck = load_checkpoint(out / "checkpoint.safetensors")
    assert ck.step == 10 and ck.extra["sampler"]["batches_drawn"] == 10  # the sampler's state is in the checkpoint
    r = fresh_process(args(tiny_index, data_file, out, runtime, "--resume", str(out / "checkpoint.safetensors")))
    assert r.returncode == 0, r.stderr
    assert "steps 11..20" in r.stdout
    assert_same_run(straight(runtime), out)


# --------------------------------------------------------------------------- divergence
def inject_nan_update(monkeypatch, at_step: int) -> None:
    """Runtimes loaded from now on apply update ``at_step`` with lr = NaN: every parameter becomes NaN
    while that step's loss (computed before the update) is still finite."""
    real_load = base.load

    def load(*a, **kw):
        rt = real_load(*a, **kw)
        real_step = rt._step

        def _step(tokens, positions, labels, hp, clip):
            if rt.step_count + 1 == at_step:
                hp = hp.copy()
                hp[0] = np.nan
            return real_step(tokens, positions, labels, hp, clip)

        rt._step = _step
        return rt

    monkeypatch.setattr(base, "load", load)


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("at_step,message", [
    (7, r"loss (is|became) nan at step 8"),  # seen by the next step's loss
    (10, r"parameter 'wte' became NaN or infinite by step 10 \(the loss was still finite.*no checkpoint written for it"),
], ids=["next-loss", "before-checkpoint"])
def test_nan_update_stops_keeps_last_good_checkpoint_and_resumes(
        tiny_index, data_file, tmp_path, straight, capsys, monkeypatch, runtime, at_step, message):
    out = tmp_path / "run"
    ckpt = out / "checkpoint.safetensors"
    inject_nan_update(monkeypatch, at_step)
    rc, err = run(capsys, args(tiny_index, data_file, out, runtime))
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("error: ")
    assert re.search(message, err[0]), err[0]
    assert f"the last good checkpoint is {ckpt} (step 5); continue with --resume {ckpt}" in err[0]
    assert load_checkpoint(ckpt).step == 5  # loads: finite, complete
    assert not (out / "weights.safetensors").exists()
    assert max(json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()) == at_step
    monkeypatch.undo()
    rc, err = run(capsys, args(tiny_index, data_file, out, runtime, "--resume", str(ckpt)))
    assert rc == 0, err
    assert_same_run(straight(runtime), out)


def test_real_divergence_exits_2_in_a_fresh_process(tiny_index, data_file, tmp_path):
    """lr 1e30: step 1 throws the parameters to ~1e30 (finite, checkpointed), step 2's loss overflows."""
    out = tmp_path / "run"
    r = fresh_process(args(tiny_index, data_file, out, "ort", "--lr", "1e30", "--min-lr", "0", "--warmup", "0",
                           "--checkpoint-every", "1", steps=5))
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert err[0].startswith("error: loss is nan at step 2; its update was written in place"), err[0]
    assert f"the last good checkpoint is {out / 'checkpoint.safetensors'} (step 1)" in err[0]
    assert load_checkpoint(out / "checkpoint.safetensors").step == 1


def test_divergence_before_any_checkpoint_says_so(tiny_index, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = run(capsys, args(tiny_index, data_file, out, "ort", "--lr", "1e30", "--min-lr", "0", "--warmup", "0", steps=5))
    assert rc == 2 and len(err) == 1
    assert "no checkpoint was written yet (the first is due at step 5); start again with a lower --lr" in err[0]
    assert not (out / "checkpoint.safetensors").exists()


# --------------------------------------------------------------------------- output folder
@pytest.fixture
def no_runtime(monkeypatch):
    """Fails the test if a runtime is loaded: the error must come before."""
    def refuse(*a, **kw):
        raise AssertionError("a runtime was loaded before the error")
    monkeypatch.setattr(base, "load", refuse)
    monkeypatch.setattr(base, "resume", refuse)


def test_out_under_a_regular_file_fails_before_training_in_a_fresh_process(tiny_index, data_file, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "run"
    r = fresh_process(args(tiny_index, data_file, out, "ort"))
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and err == [f"error: --out {out} is not a writable folder: Not a directory"], r.stderr
    assert "training" not in r.stdout


def test_out_is_a_regular_file(tiny_index, data_file, tmp_path, capsys, no_runtime):
    (tmp_path / "file").write_text("x")
    rc, err = run(capsys, args(tiny_index, data_file, tmp_path / "file", "ort"))
    assert rc == 2 and err == [f"error: --out {tmp_path / 'file'} is not a writable folder: File exists"]


@pytest.fixture
def tiny_disk(tmp_path, monkeypatch):
    """A 64 KiB tmpfs when we may mount one; otherwise a folder whose reported free space is 64 KiB."""
    folder = tmp_path / "disk"
    folder.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True)
    if r.returncode != 0:
        real = train_mod.shutil.disk_usage
        monkeypatch.setattr(train_mod.shutil, "disk_usage",
                            lambda p: real(p)._replace(free=64 << 10) if str(p).startswith(str(folder)) else real(p))
    yield folder
    if r.returncode == 0:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("runtime", ["ort", "ort-training"])
def test_disk_too_small_fails_before_training(tiny_index, data_file, tiny_disk, capsys, no_runtime, runtime):
    out = tiny_disk / "run"
    rc, err = run(capsys, args(tiny_index, data_file, out, runtime))
    assert rc == 2 and len(err) == 1, err
    assert re.fullmatch(
        rf"error: --out {out} has [\d,]+ bytes free on its disk; this run needs about [\d,]+ "
        r"\(checkpoint ~[\d,]+, weights ~[\d,]+\): free some space or choose another --out", err[0]), err[0]
    assert not (out / "log.jsonl").exists()


def test_disk_full_during_run_keeps_previous_checkpoint(tiny_index, data_file, tmp_path, straight, capsys, monkeypatch,
                                                        enospc_after):
    """The disk fills after step 7: the step-10 checkpoint cannot be written (ENOSPC at fsync, the last
    moment a write can fail); the run stops with one clear line, the step-5 checkpoint is intact,
    no temporary file is left, and --resume completes the run exactly."""
    real_load = base.load

    def load(*a, **kw):
        rt = real_load(*a, **kw)
        real_step = rt._step

        def _step(*b):
            if rt.step_count + 1 == 8:
                enospc_after["armed"] = True
            return real_step(*b)

        rt._step = _step
        return rt

    monkeypatch.setattr(base, "load", load)
    out = tmp_path / "run"
    ckpt = out / "checkpoint.safetensors"
    rc, err = run(capsys, args(tiny_index, data_file, out, "ort"))
    assert rc == 2 and err == [
        f"error: could not write {ckpt}: No space left on device (ENOSPC); the previous file is intact; "
        "free some space or choose another output folder"], err
    assert load_checkpoint(ckpt).step == 5
    assert not [f for f in out.iterdir() if f.name.endswith(".tmp")]
    monkeypatch.undo()
    rc, err = run(capsys, args(tiny_index, data_file, out, "ort", "--resume", str(ckpt)))
    assert rc == 0, err
    assert_same_run(straight("ort"), out)


# --------------------------------------------------------------------------- data and options
DATA_ROWS = [
    ("empty", b"", r"error: corpus '.*empty\.txt' is empty \(0 bytes in 1 file\(s\)\)"),
    ("shorter-than-one-sequence", b"0123456",
     r"error: .*short\.txt holds 6 tokens; one batch of sequence length T=8 needs at least T\+1 = 9"),
    ("one-byte", b"x", r"error: cannot split 1 tokens with val_fraction 0.05: nothing would be left to train on"),
    ("missing", None, r"error: corpus path '.*missing\.txt' does not exist"),
]


@pytest.mark.parametrize("row,content,message", DATA_ROWS, ids=[r[0] for r in DATA_ROWS])
def test_bad_data_fails_before_anything_is_loaded_or_created(tiny_index, tmp_path, capsys, no_runtime, row, content, message):
    name = {"empty": "empty.txt", "shorter-than-one-sequence": "short.txt", "one-byte": "one.txt"}.get(row, "missing.txt")
    data = tmp_path / name
    if content is not None:
        data.write_bytes(content)
    out = tmp_path / "run"
    rc, err = run(capsys, args(tiny_index, data, out, "ort"))
    assert rc == 2 and len(err) == 1 and re.fullmatch(message, err[0]), err
    assert not out.exists()


OPTION_ROWS = [
    (["--steps", "0"], r"error: --steps must be >= 1, got 0"),
    (["--batch", "0"], r"error: --batch must be >= 1, got 0"),
    (["--seq", "65"], r"error: --seq must be in \[1, 64\] \(the context\), got 65"),
    (["--lr", "-1"], r"error: --lr must be >= 0, got -1.0"),
    (["--lr", "nan"], r"error: --lr must be >= 0, got nan"),
    (["--stop-after", "0"], r"error: --stop-after must be >= 1, got 0"),
    (["--threads", "0"], r"error: --threads must be >= 1, got 0"),
    (["--artifacts", "/nonexistent/folder"], r"error: artifact folder /nonexistent/folder does not exist .*"),
]


@pytest.mark.parametrize("extra,message", OPTION_ROWS, ids=[" ".join(r[0]) for r in OPTION_ROWS])
def test_bad_option_fails_before_anything_is_loaded(tiny_index, data_file, tmp_path, capsys, no_runtime, extra, message):
    rc, err = run(capsys, args(tiny_index, data_file, tmp_path / "run", "ort") + extra)
    assert rc == 2 and len(err) == 1 and re.fullmatch(message, err[0]), err


def test_resume_with_other_batch_or_artifacts_is_refused(tiny_index, tiny_dense, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(capsys, args(tiny_index, data_file, out, "ort", "--stop-after", "5"))[0] == 0
    ckpt = out / "checkpoint.safetensors"
    before = ckpt.read_bytes()
    rc, err = run(capsys, args(tiny_index, data_file, out, "ort", "--resume", str(ckpt)) + ["--batch", "3"])
    assert rc == 2 and err == ["error: sampler state has batch=1, but this sampler has batch=3"], err
    rc, err = run(capsys, args(tiny_dense, data_file, out, "ort", "--resume", str(ckpt)))
    assert rc == 2 and "was written for another model" in err[0], err
    rc, err = run(capsys, args(tiny_index, data_file, out, "ort-training", "--resume", str(ckpt)))
    assert rc == 2 and "holds no ONNX Runtime training state" in err[0], err
    assert ckpt.read_bytes() == before
