"""Nothing a user owns is deleted or overwritten.

- ``graphgen build --out DIR`` replaces DIR only when it is empty or an artifact
  folder holding nothing but its own files (``--force``: extra files too), and
  never a folder that is not one; refusals touch nothing and exit 2.
- No runtime or CLI writes into an artifact folder.
- A run folder has one writer at a time (a lock; stale ones are taken over).
- Every file a run writes is replaced atomically, so a planted link is replaced,
  not followed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import runtimes
from runtimes.errors import OutputError
from runtimes.runlock import RunLock
from runtimes.train import TrainOptions, train

ROOT = Path(__file__).resolve().parents[1]
TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(200))


def cli(*args, cwd=ROOT, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def one_error_line(p: subprocess.CompletedProcess, *needles: str) -> str:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def tree(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` with the sha256 of its bytes (or 'dir' / the link target)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


BUILD = ("-m", "graphgen", "build", "--config", "tiny", "--n-layers", "1")


# --------------------------------------------------------------------------- graphgen build --out
def test_build_refuses_a_folder_that_is_not_an_artifact_folder(tmp_path):
    (tmp_path / "v" / "sub").mkdir(parents=True)
    (tmp_path / "v" / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    for force in ((), ("--force",)):
        p = cli(*BUILD, "--out", str(tmp_path / "v"), *force)
        one_error_line(p, str(tmp_path / "v"), "notes.txt", "sub", "not an artifact folder")
        assert tree(tmp_path) == before  # nothing touched, no temporary folder left


def test_build_refuses_the_working_directory(tmp_path):
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    before = tree(tmp_path)
    p = cli(*BUILD, "--out", ".", cwd=tmp_path)
    one_error_line(p, ".git", "code.py")
    assert tree(tmp_path) == before


def test_build_replaces_its_own_folder_and_refuses_extra_files_without_force(tmp_path):
    out = tmp_path / "art"
    assert cli(*BUILD, "--out", str(out)).returncode == 0
    first = (out / "manifest.json").read_text()
    assert cli(*BUILD, "--out", str(out), "--seed", "7").returncode == 0  # an artifact folder alone: replaced
    assert (out / "manifest.json").read_text() != first and '"seed": 7' in (out / "manifest.json").read_text()
    (out / "my-notes.txt").write_text("keep me")
    before = tree(tmp_path)
    one_error_line(cli(*BUILD, "--out", str(out)), str(out), "my-notes.txt", "--force")
    assert tree(tmp_path) == before
    assert cli(*BUILD, "--out", str(out), "--force").returncode == 0
    assert not (out / "my-notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no temporary or old folder left


def test_build_into_an_empty_or_new_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert cli(*BUILD, "--out", str(tmp_path / "empty")).returncode == 0
    assert (tmp_path / "empty" / "manifest.json").is_file()
    assert cli(*BUILD, "--out", str(tmp_path / "new" / "deeper")).returncode == 0


@pytest.mark.parametrize("case", ["existing file", "under a file", "symlink"])
def test_build_out_that_cannot_be_a_folder(tmp_path, case):
    (tmp_path / "f").write_text("data")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    out = {"existing file": tmp_path / "f", "under a file": tmp_path / "f" / "sub", "symlink": tmp_path / "link"}[case]
    before = tree(tmp_path)
    one_error_line(cli(*BUILD, "--out", str(out)), str(out))
    assert tree(tmp_path) == before


def test_build_out_in_an_unwritable_folder(tmp_path, monkeypatch, capsys):
    """As a user without write permission sees it (simulated: the tests may run as root)."""
    import errno

    from contract import outfolder
    from graphgen import __main__ as build_cli

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(outfolder.tempfile, "mkdtemp", denied)
    assert build_cli.main(["build", "--config", "tiny", "--out", str(tmp_path / "ro" / "art")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "Permission denied" in err[0], err


@pytest.mark.parametrize("flag,value,needle", [
    ("--eps", "inf", "eps"), ("--eps", "nan", "eps"), ("--weight-decay", "inf", "weight_decay"),
    ("--weight-decay", "nan", "weight_decay"), ("--beta1", "0.9999999999", "beta1"),
    ("--context", "100000000000", "context must be at most"), ("--vocab", "100000000000", "parameters"),
])
def test_build_bad_values_exit_2_with_one_line(tmp_path, flag, value, needle):
    one_error_line(cli(*BUILD, flag, value, "--out", str(tmp_path / "art")), needle)
    assert not (tmp_path / "art").exists()


# --------------------------------------------------------------------------- artifact folders are read-only
@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "corpus.txt"
    p.write_text(TEXT)
    return p


def train_args(art: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "runtimes", "train", "--artifacts", str(art), "--runtime", "ort", "--data", str(data),
            "--out", str(out), "--steps", "2", "--batch", "1", "--seq", "8", "--eval-batches", "1",
            "--sample-bytes", "4", "--threads", "1", "--no-progress", *extra]


@pytest.mark.parametrize("where", ["the folder", "a subfolder"])
def test_train_refuses_out_inside_the_artifact_folder(tiny_index, data_file, where):
    before = tree(tiny_index)
    out = tiny_index if where == "the folder" else tiny_index / "run"
    one_error_line(cli(*train_args(tiny_index, data_file, out)), str(out), str(tiny_index))
    assert tree(tiny_index) == before


def test_runtimes_never_write_into_an_artifact_folder(tiny_index, tmp_path):
    before = tree(tiny_index)
    rt = runtimes.load(tiny_index, runtime="ort")
    for path in (tiny_index / "weights.safetensors", tiny_index / "new.safetensors"):
        with pytest.raises(OutputError, match="artifact folder") as e:
            rt.export_weights(path)
        assert str(path) in str(e.value) and str(tiny_index) in str(e.value)
    for path in (tiny_index / "checkpoint", tiny_index / "sub" / "ckpt.safetensors"):
        with pytest.raises(OutputError, match="artifact folder"):
            rt.save(path)
    assert tree(tiny_index) == before
    rt.save(tmp_path / "ok.safetensors")  # anywhere else is fine
    rt.export_weights(tmp_path / "w.safetensors")


# --------------------------------------------------------------------------- one writer per run folder
def test_second_run_on_the_same_out_exits_2_naming_the_holder(tiny_index, data_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with RunLock(out):
        line = one_error_line(cli(*train_args(tiny_index, data_file, out)), f"PID {os.getpid()}", str(out))
        assert "in use" in line
    assert not (out / "log.jsonl").exists()
    assert cli(*train_args(tiny_index, data_file, out)).returncode == 0  # released with its holder


def test_lock_of_a_dead_process_is_taken_over(tiny_index, data_file, tmp_path):
    out = tmp_path / "run"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out.mkdir()
    (out / ".lock").write_text(f"{dead.pid}\n")  # what a killed run leaves: the file, no lock held
    p = cli(*train_args(tiny_index, data_file, out))
    assert p.returncode == 0, p.stderr


def test_lock_held_by_a_killed_process_is_released(tmp_path):
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from runtimes.runlock import RunLock; "
            "RunLock(sys.argv[2]).acquire(); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputError, match=f"PID {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path):
        pass


def test_lock_is_released_when_train_fails(tiny_index, data_file, tmp_path, monkeypatch):
    from runtimes import base

    def broken(*a, **k):
        raise runtimes.RuntimeUnavailable("no runtime here")

    monkeypatch.setattr(base, "load", broken)
    opts = TrainOptions(artifacts=str(tiny_index), runtime="ort", data=str(data_file), out=str(tmp_path / "r"),
                        steps=1, batch=1, seq=8, progress=False, sample_bytes=0)
    with pytest.raises(runtimes.RuntimeUnavailable):
        train(opts, echo=lambda *a: None)
    with RunLock(tmp_path / "r"):  # free again
        pass


# --------------------------------------------------------------------------- links are replaced, not followed
def test_planted_links_in_out_are_replaced_not_followed(tiny_index, data_file, tmp_path):
    out, victims = tmp_path / "run", tmp_path / "victims"
    out.mkdir()
    victims.mkdir()
    names = ["summary.json", "sample.txt", "loss.png", "log.jsonl", "weights.safetensors", "checkpoint.safetensors"]
    for name in names:
        (victims / name).write_text("precious")
        (out / name).symlink_to(victims / name)
    p = cli(*train_args(tiny_index, data_file, out, "--checkpoint-every", "1"))
    assert p.returncode == 0, p.stderr
    for name in names:
        assert (victims / name).read_text() == "precious", name
        assert not (out / name).is_symlink() and (out / name).stat().st_size > 0, name
    assert np.isfinite(float(__import__("json").loads((out / "summary.json").read_text())["final_val_loss"]))
