"""Data parallel over MPI (runtimes/distributed.py), 2 ranks on this machine under mpiexec.

Tiny preset, 10 steps of 4x32 at one thread per process. Measured (ort): 2 ranks x 2
sequences make, bit for bit, the losses, parameters and moments of one process with
--accumulate 2 (each sums g0 + g1 and divides by 2), with and without
--shard-optimizer; against the single-graph train_step.onnx path and against one rank
with the whole batch, losses agree within 1e-7 relative and parameters within 2e-7
(relative L2 per tensor; the attention key biases, whose gradient is zero in exact
arithmetic, within 1e-7 absolute: see test_accumulate.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import runtimes
from contract.hp import make_hp
from runtimes.__main__ import main
from runtimes.checkpoint import load_checkpoint
from runtimes.errors import InputError, RuntimeUnavailable
from tests.parity_util import batches

ROOT = Path(__file__).resolve().parents[1]
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
# make test installs mpi4py and Open MPI (the mpi extra); only an environment without them skips these
HAVE_MPI = importlib.util.find_spec("mpi4py") is not None and MPIEXEC is not None
NO_MPI = "mpi4py and Open MPI are not installed (pip install '.[mpi]')"
needs_mpi = pytest.mark.skipif(not HAVE_MPI, reason=NO_MPI)
MPI_FLAGS = ["--allow-run-as-root", "--oversubscribe"]  # root in containers; 2 ranks on however many cores
COMMON = ["--steps", "10", "--batch", "4", "--seq", "32", "--eval-batches", "2", "--eval-every", "5",
          "--sample-bytes", "0", "--no-progress", "--threads", "1", "--checkpoint-every", "5"]


def _env(**extra) -> dict:
    return {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "PYTHONPATH": str(ROOT), **extra}


def _mpi_train(n: int, art: Path, out: Path, *args: str, check: bool = True, **env) -> subprocess.CompletedProcess:
    cmd = [MPIEXEC, "-n", str(n), *MPI_FLAGS, sys.executable, "-m", "runtimes", "train", "--data-parallel",
           "--artifacts", str(art), "--out", str(out), *COMMON, *args]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def _train(art: Path, out: Path, *args: str) -> None:
    rc = main(["train", "--artifacts", str(art), "--out", str(out), *COMMON, *args])
    assert rc == 0


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def _state(out: Path):
    return load_checkpoint(out / "checkpoint.safetensors")


def _assert_bit_identical(a: Path, b: Path) -> None:
    assert _losses(a) == _losses(b)
    ca, cb = _state(a), _state(b)
    assert ca.step == cb.step
    for n in ca.params:
        np.testing.assert_array_equal(ca.params[n], cb.params[n], err_msg=n)
        np.testing.assert_array_equal(ca.adam_m[n], cb.adam_m[n], err_msg=n)
        np.testing.assert_array_equal(ca.adam_v[n], cb.adam_v[n], err_msg=n)


def _assert_close(a: Path, b: Path) -> None:
    la, lb = _losses(a), _losses(b)
    assert len(la) == len(lb) == 10
    for x, y in zip(la, lb):
        assert abs(x - y) <= 1e-6 * abs(y), (la, lb)
    pa, pb = _state(a).params, _state(b).params
    for n in pb:
        if n.endswith(".b_k"):  # zero gradient in exact arithmetic: AdamW's answer to rounding noise
            assert np.abs(pa[n] - pb[n]).max() <= 1e-6, n
        else:
            assert np.linalg.norm(pa[n] - pb[n]) <= 1e-5 * np.linalg.norm(pb[n]), n


@pytest.fixture(scope="module")
def runs(tiny_index, tmp_path_factory):
    """The runs several tests compare, made once: 10 steps each."""
    if not HAVE_MPI:
        pytest.skip(NO_MPI)
    root = tmp_path_factory.mktemp("dp")
    r = SimpleNamespace(art=tiny_index, root=root)
    r.single = root / "single"  # train_step.onnx, one process
    _train(tiny_index, r.single)
    r.acc2 = root / "acc2"  # one process, --accumulate 2
    _train(tiny_index, r.acc2, "--accumulate", "2")
    r.dp2 = root / "dp2"
    _mpi_train(2, tiny_index, r.dp2)
    return r


def test_two_ranks_equal_the_single_graph_step(runs):
    _assert_close(runs.dp2, runs.single)


def test_two_ranks_are_one_process_accumulating_two_bit_for_bit(runs):
    _assert_bit_identical(runs.dp2, runs.acc2)


def test_one_rank_with_the_whole_batch(runs):
    """A singleton (no mpiexec): one rank x B through grad_step + apply_step."""
    out = runs.root / "dp1"
    p = subprocess.run([sys.executable, "-m", "runtimes", "train", "--data-parallel", "--artifacts", str(runs.art),
                        "--out", str(out), *COMMON], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    _assert_close(out, runs.single)
    _assert_close(runs.dp2, out)


def test_sharded_optimizer_is_plain_data_parallel_bit_for_bit(runs):
    out = runs.root / "zero2"
    p = _mpi_train(2, runs.art, out, "--shard-optimizer")
    assert "2 data-parallel ranks sharing the optimizer state" in p.stdout
    _assert_bit_identical(out, runs.dp2)  # the checkpoint's moments, gathered from both ranks, included
    _assert_close(out, runs.single)


def test_checkpoint_of_two_ranks_resumes_on_one(runs):
    """2 ranks stop at step 5; one process with --accumulate 2 (the same sums) finishes: bit for bit
    the uninterrupted 2-rank run."""
    out = runs.root / "two-then-one"
    _mpi_train(2, runs.art, out, "--stop-after", "5")
    assert _state(out).step == 5 and len(_losses(out)) == 5
    _train(runs.art, out, "--accumulate", "2", "--resume", str(out / "checkpoint.safetensors"))
    _assert_bit_identical(out, runs.dp2)


def test_checkpoint_of_one_process_resumes_on_two_ranks(runs):
    out = runs.root / "one-then-two"
    _train(runs.art, out, "--accumulate", "2", "--stop-after", "5")
    _mpi_train(2, runs.art, out, "--shard-optimizer", "--resume", str(out / "checkpoint.safetensors"))
    _assert_bit_identical(out, runs.acc2)


def _rank_pids(tag: str) -> dict[int, int]:
    """rank -> pid of the processes started with GPT2_DP_TEST_TAG=tag (mpiexec passes its environment on)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_bytes().decode(errors="replace").split("\0")
                       if "=" in kv)
        except OSError:
            continue
        if env.get("GPT2_DP_TEST_TAG") == tag and "OMPI_COMM_WORLD_RANK" in env:
            found[int(env["OMPI_COMM_WORLD_RANK"])] = int(proc.name)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


LONG_RUN = [*COMMON, "--steps", "100000", "--checkpoint-every", "3", "--eval-every", "1000000"]


def _signal_rank_1_of_a_running_job(art: Path, out: Path, sig: int, **env) -> tuple[dict[int, int], str]:
    """Start 2 ranks on a long run, send ``sig`` to rank 1 once 7 steps are logged; wait (at most 60 s) for
    mpiexec to end. Returns the ranks' pids and mpiexec's stderr."""
    tag = uuid.uuid4().hex
    cmd = [MPIEXEC, "-n", "2", *MPI_FLAGS, sys.executable, "-m", "runtimes", "train", "--data-parallel",
           "--shard-optimizer", "--artifacts", str(art), "--out", str(out), *LONG_RUN]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(GPT2_DP_TEST_TAG=tag, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    pids = {}
    try:
        deadline = time.monotonic() + 120
        while not ((out / "log.jsonl").is_file() and len((out / "log.jsonl").read_text().splitlines()) >= 7):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        pids = _rank_pids(tag)
        assert sorted(pids) == [0, 1], pids
        os.kill(pids[1], sig)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
        assert time.monotonic() - t0 < 60
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for pid in pids.values():  # a stopped rank left behind by a failed test
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert not any(_alive(pid) for pid in pids.values())
    return pids, err


@needs_mpi
def test_killed_rank_stops_the_others_and_the_checkpoint_resumes(tiny_index, tmp_path):
    out = tmp_path / "run"
    pids, err = _signal_rank_1_of_a_running_job(tiny_index, out, signal.SIGKILL)
    lines = [ln for ln in err.splitlines() if ln.startswith("error: rank 0:")]
    assert len(lines) == 1, err
    assert f"rank 1 (pid {pids[1]} on " in lines[0] and "was lost" in lines[0], lines[0]
    ckpt = load_checkpoint(out / "checkpoint.safetensors")
    assert ckpt.step >= 6 and ckpt.step % 3 == 0
    assert f"--resume {out / 'checkpoint.safetensors'}" in lines[0]
    rc = main(["train", "--artifacts", str(tiny_index), "--out", str(out), *LONG_RUN, "--steps", str(ckpt.step + 2),
               "--resume", str(out / "checkpoint.safetensors")])
    assert rc == 0 and _state(out).step == ckpt.step + 2


@needs_mpi
def test_hung_rank_ends_the_job_through_the_watchdog(tiny_index, tmp_path):
    """Rank 1 stopped (SIGSTOP), not dead: mpiexec notices nothing; rank 0's collective times out."""
    _, err = _signal_rank_1_of_a_running_job(tiny_index, tmp_path / "run", signal.SIGSTOP, GPT2_ONNX_DP_TIMEOUT="20")
    lines = [ln for ln in err.splitlines() if ln.startswith("error: rank 0:")]
    assert len(lines) == 1 and "did not complete within 20 s: a rank hangs" in lines[0], err


@needs_mpi
def test_error_on_one_rank_ends_the_others(tiny_index, tmp_path):
    """Rank 0 cannot take --out (another run holds it) while rank 1 waits for it at the start."""
    from runtimes.runlock import RunLock

    out = tmp_path / "run"
    out.mkdir()
    lock = RunLock(out)
    lock.acquire()
    try:
        p = _mpi_train(2, tiny_index, out, check=False)
    finally:
        lock.release()
    assert p.returncode != 0
    assert f"error: {out} is in use by another training run (PID {os.getpid()})" in p.stderr, p.stderr
    # rank 0 aborts after its line; rank 1 finds it gone, or (if still there) blames another rank
    assert re.search(r"error: rank 1: (rank 0 \(pid \d+ on .+\) was lost|stopped by mpiexec: another rank failed)",
                     p.stderr), p.stderr


# --- without mpiexec --------------------------------------------------------------------


@pytest.mark.parametrize("runtime, share", [("ort", slice(3, 9)), ("reference", slice(3, 9)), ("ort", slice(0, 0))])
def test_sharded_apply_updates_only_its_parameters_exactly(tiny_index, runtime, share):
    """apply_step.onnx cut to some parameters (shard.py) is the whole apply_step on them, bit for bit;
    a rank may own none (more ranks than parameters)."""
    full, part = runtimes.load(tiny_index, runtime=runtime), runtimes.load(tiny_index, runtime=runtime)
    names = full.art.param_names
    owned = names[share]
    part._shard_moments(owned)
    others = [n for n in names if n not in owned]
    for t, batch in enumerate(batches(full.art.config, 2, batch=2, seq=16), 1):
        _, grads = full._micro_gradients(*batch)
        prev, hp = part.parameters(), make_hp(1e-3, step=t)
        full._apply_gradients(grads, hp, np.array(0.5, np.float32))  # clipping on: the norm is above 0.5
        part._apply_gradients(grads, hp, np.array(0.5, np.float32))
        assert part.last_grad_norm == full.last_grad_norm > 0.5
        buf, now = part._parameter_buffers(others), full.parameters()
        for n in others:
            np.testing.assert_array_equal(buf[n], prev[n], err_msg=n)  # not touched
            buf[n][...] = now[n]  # what the broadcast from their owners does
    pf, pp = full.parameters(), part.parameters()
    (mf, vf), (mp, vp) = full.moments(), part.moments()
    assert sorted(mp) == sorted(owned)
    for n in names:
        np.testing.assert_array_equal(pp[n], pf[n], err_msg=n)
    for n in owned:
        np.testing.assert_array_equal(mp[n], mf[n], err_msg=n)
        np.testing.assert_array_equal(vp[n], vf[n], err_msg=n)


def test_partition_is_contiguous_and_balanced():
    from runtimes.distributed import partition

    sizes = [100, 5, 5, 40, 40, 40, 40, 30]
    for n in (1, 2, 3, 4):
        owners = partition(sizes, n)
        assert owners == sorted(owners) and owners[0] == 0 and owners[-1] == n - 1
        loads = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(n)]
        assert max(loads) - sum(sizes) / n <= max(sizes), loads
    assert partition([1, 1], 4) == [1, 3]  # more ranks than parameters: ranks 0 and 2 own nothing


class _World:
    """Stands in for runtimes.distributed.World where a check fails before any message is sent."""

    def __init__(self, size):
        self.rank, self.size = 0, size

    def barrier(self, what=""):
        pass

    def default_threads(self):
        return 1


def test_batch_must_share_out_among_ranks(tiny_index, tmp_path):
    from runtimes.train import TrainOptions, _Run

    opts = TrainOptions(artifacts=str(tiny_index), out=str(tmp_path / "r"), batch=6, accumulate=2,
                        data_parallel=True, progress=False)
    with pytest.raises(InputError, match=r"--batch 6 must be divisible by ranks x --accumulate \(2 x 2\)"):
        _Run(opts, print, _World(2))
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, message", [
    (["--data-parallel", "--runtime", "ort-training"], "--data-parallel needs the split step graphs, which "
                                                       "ort-training does not run; use --runtime ort"),
    (["--shard-optimizer"], "--shard-optimizer shares the optimizer state among data-parallel ranks: add "
                            "--data-parallel"),
])
def test_cli_refuses(tiny_index, tmp_path, capsys, args, message):
    rc = main(["train", "--artifacts", str(tiny_index), "--out", str(tmp_path / "run"), "--steps", "1",
               "--no-progress", *args])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"error: {message}\n", err


def test_missing_mpi4py_says_how_to_install(tiny_index, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    from runtimes.distributed import _mpi

    with pytest.raises(RuntimeUnavailable, match=r"pip install '\.\[mpi\]'"):
        _mpi()
    rc = main(["train", "--artifacts", str(tiny_index), "--out", str(tmp_path / "run"), "--steps", "1",
               "--no-progress", "--data-parallel"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --data-parallel needs mpi4py") and err.count("\n") == 1, err


@pytest.fixture
def old_folder(tiny_index, tmp_path):
    """tiny as built before the split step graphs: no grad_step.onnx or apply_step.onnx."""
    old = tmp_path / "old"
    shutil.copytree(tiny_index, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for f in ("grad_step.onnx", "apply_step.onnx"):
        del manifest["files"][f], manifest["models"][f]
        (old / f).unlink()
    (old / "manifest.json").write_text(json.dumps(manifest))
    return old


@pytest.mark.parametrize("world", [None, 1, 2])
def test_folder_without_split_graphs_says_to_rebuild(old_folder, tmp_path, world):
    from runtimes.errors import ArtifactError
    from runtimes.train import TrainOptions, _Run

    opts = TrainOptions(artifacts=str(old_folder), out=str(tmp_path / "r"), batch=4, accumulate=1 if world else 2,
                        data_parallel=world is not None, progress=False, steps=1)
    with pytest.raises(ArtifactError, match=r"predates the split step graphs .*python -m graphgen build"):
        _Run(opts, print, _World(world) if world else None)


@needs_mpi
def test_bench_dp_counts_the_bytes_on_the_wire(tiny_index, tmp_path, capsys):
    """bench.dp over TCP: what the loopback carried per rank and step is at least the theory (a ring
    Allreduce's 2(N-1)/N x gradient, plus the sharded optimizer's (N-1)/N x parameter broadcast);
    headers and other traffic on the loopback only add."""
    from bench import dp

    out = tmp_path / "dp.json"
    assert dp.main(["--config", "tiny", "--artifacts", str(tiny_index), "--batch", "4", "--seq", "16", "--steps", "2",
                    "--modes", "single,zero-tcp", "--json", str(out)]) == 0
    z = json.loads(out.read_text())["summary"]["zero-tcp"]
    grad_mib = 4 * sum(int(np.prod(s)) for s in runtimes.load(tiny_index).art.param_shapes.values()) / 2**20
    assert z["theory_mib_per_rank"] == pytest.approx(grad_mib)  # 2 (N-1)/N = 1 at N = 2
    assert z["wire_mib_per_rank"] >= 0.98 * (grad_mib + grad_mib / 2), z
    assert set(z["phases_ms"]) == {"grad", "allreduce", "apply", "broadcast"} and len(z["peak_rss_mib"]) == 2
    assert "zero-tcp" in capsys.readouterr().out
