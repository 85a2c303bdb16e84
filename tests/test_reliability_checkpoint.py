"""Artifact folders and checkpoints that are damaged, from another version or another config,
writers killed mid-save, and full disks.

Every bad folder or checkpoint must raise one clear error naming the file (and
the value and what was expected) before any session runs, on every runtime.
Saves are atomic: a writer SIGKILLed at random points always leaves a
checkpoint that loads and resumes; a write that fails for lack of space raises
OutputError and leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import runtimes
from contract import files as files_mod
from runtimes.checkpoint import load_checkpoint, save_checkpoint, write_atomic
from runtimes.errors import ArtifactError, CheckpointError, GPT2OnnxError, OutputError

ROOT = Path(__file__).resolve().parents[1]
RUNTIMES = ["ort", "ort-training", "reference"]


# --------------------------------------------------------------------------- artifact folders
def clone(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    """A folder of symlinks to ``src``'s files (cheap); files to be altered are written in place of links."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).symlink_to(f)
    return dst


def replace_file(folder: Path, name: str, data: bytes) -> None:
    (folder / name).unlink()
    (folder / name).write_bytes(data)


def edit_manifest(folder: Path, fn) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    fn(m)
    replace_file(folder, "manifest.json", json.dumps(m).encode())


def flip_byte(folder: Path, name: str) -> None:
    data = bytearray((folder / name).read_bytes())
    data[len(data) // 2] ^= 0x55
    replace_file(folder, name, bytes(data))


def set_shape(m, name, shape):
    next(p for p in m["parameters"] if p["name"] == name)["shape"] = shape


ARTIFACT_ROWS = [
    ("missing-train_step", lambda d: (d / "train_step.onnx").unlink(),
     r"file train_step\.onnx listed in manifest\.json is missing"),
    ("missing-training_model", lambda d: (d / "training_model.onnx").unlink(),
     r"file training_model\.onnx listed in manifest\.json is missing"),
    ("missing-manifest", lambda d: (d / "manifest.json").unlink(), r"has no manifest\.json"),
    ("sha256-weights", lambda d: flip_byte(d, "weights.safetensors"),
     r"weights\.safetensors: sha256 differs from manifest\.json"),
    ("sha256-checkpoint", lambda d: flip_byte(d, "checkpoint"), r"checkpoint: sha256 differs from manifest\.json"),
    ("truncated-train_step", lambda d: replace_file(d, "train_step.onnx", (d / "train_step.onnx").read_bytes()[:-100]),
     r"train_step\.onnx: \d+ bytes, manifest\.json says \d+ \(truncated or replaced\?\)"),
    ("manifest-version-5", lambda d: edit_manifest(d, lambda m: m.update(format_version=5)),
     r"format_version 5 is not one this runner reads \(3, 4\)"),
    ("manifest-version-4-without-frozen", lambda d: edit_manifest(d, lambda m: m.update(format_version=4)),
     r"format_version 4 \(frozen inputs\) needs the objects 'frozen' and 'lora'"),
    ("manifest-version-2", lambda d: edit_manifest(d, lambda m: m.update(format_version=2)),
     r"format_version 2 is retired: its train_step.onnx has no gradient-clipping input.*rebuild"),
    ("manifest-version-1", lambda d: edit_manifest(d, lambda m: m.update(format_version=1)),
     r"format_version 1 is retired: its train_step.onnx computes wrong embedding gradients.*rebuild"),
    ("manifest-other-format", lambda d: edit_manifest(d, lambda m: m.update(format="something-else")),
     r"not a gpt2-onnx-artifacts manifest \(format='something-else'\)"),
    ("manifest-not-json", lambda d: replace_file(d, "manifest.json", b"{not json"), r"manifest\.json is not valid JSON"),
    ("manifest-hp-layout", lambda d: edit_manifest(d, lambda m: m["hp"].update(layout=["lr", "beta1"], length=2)),
     r"hp is 'float32'\[2\] \['lr', 'beta1'\], this runner feeds float32\[7\]"),
    ("manifest-files-entry", lambda d: edit_manifest(d, lambda m: m["files"]["forward.onnx"].pop("sha256")),
     r"files\['forward\.onnx'\] = .* is not \{sha256, bytes\}"),
    # another config: the manifest disagrees with the weights it ships, or with itself
    ("manifest-shape-vs-weights", lambda d: edit_manifest(d, lambda m: set_shape(m, "h0.ln1_g", [65])),
     r"weights\.safetensors: parameter 'h0\.ln1_g' is F32\[64\], manifest\.json says F32\[65\] \(manifest from another config\?\)"),
    ("manifest-param-not-in-weights", lambda d: edit_manifest(d, lambda m: m["parameters"].append(
        {"name": "extra", "shape": [3], "dtype": "float32"})),
     r"weights\.safetensors: has no parameter 'extra'"),
    ("manifest-context-vs-wpe", lambda d: edit_manifest(d, lambda m: m["config"].update(context=128)),
     r"parameter 'wpe' has shape \[64, 64\], but config .*context 128.* implies \[128, 64\]: the manifest is from another config"),
    ("manifest-vocab-vs-wte", lambda d: edit_manifest(d, lambda m: m["config"].update(vocab=300)),
     r"parameter 'wte' has shape \[256, 64\], but config .* implies \[300, 64\]"),
]


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("row,damage,message", ARTIFACT_ROWS, ids=[r[0] for r in ARTIFACT_ROWS])
def test_bad_artifact_folder(tiny_index, tmp_path, runtime, row, damage, message):
    folder = clone(tiny_index, tmp_path / "art")
    damage(folder)
    with pytest.raises(ArtifactError, match=message):
        runtimes.load(folder, runtime=runtime)


# --------------------------------------------------------------------------- checkpoints
_saved: dict = {}


@pytest.fixture
def saved(tiny_index, tmp_path_factory):
    """A checkpoint per runtime after two steps (cached for the module)."""
    def get(runtime: str) -> Path:
        if runtime not in _saved:
            rt = runtimes.load(tiny_index, runtime=runtime, threads=1)
            rng = np.random.default_rng(0)
            for _ in range(2):
                tok = rng.integers(0, 256, (1, 8))
                rt.step(tok, np.arange(8)[None], np.roll(tok, -1, 1), runtimes.make_hp(1e-3, step=rt.step_count + 1))
            path = tmp_path_factory.mktemp("ckpt") / f"{runtime}.safetensors"
            rt.save(path, extra={"note": "two steps"})
            _saved[runtime] = path
        return _saved[runtime]
    return get


def rewrite(src: Path, dst: Path, fn) -> Path:
    """Load a good checkpoint, change it with ``fn(ckpt)``, and save it properly (valid file, bad content)."""
    c = load_checkpoint(src)
    fn(c)
    save_checkpoint(dst, c)
    return dst


def with_meta(src: Path, dst: Path, **meta) -> Path:
    """The same tensors under altered metadata (what another version of this package might write)."""
    from safetensors import safe_open

    with safe_open(str(src), framework="numpy") as f:
        old = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(dst), metadata={**old, **meta})
    return dst


def truncated(src: Path, dst: Path, keep) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: keep(len(data))])
    return dst


CHECKPOINT_ROWS = [
    ("empty-file", lambda s, d: truncated(s, d, lambda n: 0), CheckpointError, r"unreadable \(truncated or not a checkpoint\)"),
    ("truncated-in-header", lambda s, d: truncated(s, d, lambda n: 100), CheckpointError, r"unreadable \(truncated"),
    ("truncated-half", lambda s, d: truncated(s, d, lambda n: n // 2), CheckpointError, r"unreadable \(truncated"),
    ("truncated-last-byte", lambda s, d: truncated(s, d, lambda n: n - 1), CheckpointError, r"unreadable \(truncated"),
    ("flipped-byte", lambda s, d: (d.write_bytes(s.read_bytes()), flip_byte(d.parent, d.name), d)[2], CheckpointError,
     r"tensor data does not match the sha256 recorded when it was saved"),
    ("missing", lambda s, d: d, CheckpointError, r"checkpoint .* does not exist"),
    ("other-version", lambda s, d: with_meta(s, d, version="2"), CheckpointError,
     r"checkpoint version '2', this runner reads 1"),
    ("not-a-checkpoint", lambda s, d: with_meta(s, d, format="weights"), CheckpointError,
     r"is not a gpt2-onnx-checkpoint file \(format='weights'\)"),
    ("negative-step", lambda s, d: rewrite(s, d, lambda c: setattr(c, "step", -1)), CheckpointError, r"step is -1, must be >= 0"),
    ("nan-parameter", lambda s, d: rewrite(s, d, lambda c: c.params["wte"].__setitem__((3, 4), np.nan)), CheckpointError,
     r"param/wte holds NaN or infinite values"),
    ("inf-moment", lambda s, d: rewrite(s, d, lambda c: c.adam_v["h1.fc_w"].__setitem__((0, 0), np.inf)), CheckpointError,
     r"adam_v/h1\.fc_w holds NaN or infinite values"),
    ("moment-missing", lambda s, d: rewrite(s, d, lambda c: c.adam_m.pop("wpe")), CheckpointError,
     r"adam_m and the parameters name different tensors \(\['wpe'\]\)"),
    ("moment-shape", lambda s, d: rewrite(s, d, lambda c: c.adam_m.__setitem__("wpe", c.adam_m["wpe"][:3])), CheckpointError,
     r"adam_m/wpe has shape \[3, 64\], its parameter \[64, 64\]"),
    ("float64-parameter", lambda s, d: rewrite(s, d, lambda c: c.params.__setitem__("wpe", c.params["wpe"].astype(np.float64))),
     CheckpointError, r"param/wpe is float64, expected float32"),
    # another config: same fingerprint claimed, but the parameters disagree with the manifest
    ("param-shape-vs-manifest", lambda s, d: rewrite(s, d, lambda c: (
        c.params.__setitem__("wpe", c.params["wpe"][:32]), c.adam_m.__setitem__("wpe", c.adam_m["wpe"][:32]),
        c.adam_v.__setitem__("wpe", c.adam_v["wpe"][:32]))), GPT2OnnxError,
     r"parameter 'wpe' is float32\[32, 64\], manifest says float32\[64, 64\]"),
]


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("row,make,error,message", CHECKPOINT_ROWS, ids=[r[0] for r in CHECKPOINT_ROWS])
def test_bad_checkpoint(saved, tmp_path, runtime, row, make, error, message):
    src = saved(runtime)
    bad = make(src, tmp_path / "bad.safetensors")
    with pytest.raises(error, match=message):
        runtimes.resume(bad, runtime=runtime)
    assert load_checkpoint(src).step == 2  # the good one is untouched


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_checkpoint_from_another_config(saved, tiny_dense, runtime):
    """Resuming with another artifact folder (here: the dense-label build) is refused by fingerprint."""
    with pytest.raises(CheckpointError, match=r"was written for another model \(fingerprint \w+\) than the artifacts in .*tiny-dense"):
        runtimes.resume(saved(runtime), runtime=runtime, artifacts=tiny_dense)


def test_checkpoint_without_ort_state_is_refused_by_ort_training(saved):
    with pytest.raises(CheckpointError, match=r"written by runtime 'ort' and holds no ONNX Runtime training state"):
        runtimes.resume(saved("ort"), runtime="ort-training")


# --------------------------------------------------------------------------- killed writers
SAVER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    from runtimes.ort_env import import_onnxruntime
    import_onnxruntime()
    import numpy as np, runtimes
    art, runtime, path = sys.argv[1:4]
    rt = (runtimes.resume(path, runtime=runtime, threads=1) if os.path.exists(path)
          else runtimes.load(art, runtime=runtime, threads=1))
    rng = np.random.default_rng(rt.step_count)
    print("ready", rt.step_count, flush=True)
    while True:
        tok = rng.integers(0, 256, (1, 8))
        rt.step(tok, np.arange(8)[None], np.roll(tok, -1, 1), runtimes.make_hp(1e-3, step=rt.step_count + 1))
        print("begin", rt.step_count, flush=True)
        rt.save(path, extra={{"step": rt.step_count}})
        print("end", rt.step_count, flush=True)
""")


@pytest.mark.parametrize("runtime,kills", [("ort", 6), ("ort-training", 3)])
def test_sigkill_during_save_leaves_a_loadable_checkpoint(tiny_index, tmp_path, runtime, kills):
    """A process saves in a loop (resuming from the file each time it starts) and is SIGKILLed
    after a random delay, several times. After every kill the file loads, holds the last
    completed save or the one in flight (never anything else), and the next process resumes
    from it. At least one kill must land inside a save for the test to mean anything."""
    script = tmp_path / "saver.py"
    script.write_text(SAVER.format(root=str(ROOT)))
    path = tmp_path / "run" / "checkpoint.safetensors"
    path.parent.mkdir()
    rnd = random.Random(1234)
    inside_save, steps_seen, k = 0, [], 0
    while k < kills or (inside_save == 0 and k < 4 * kills):  # more kills only if none has landed inside a save yet
        k += 1
        p = subprocess.Popen([sys.executable, str(script), str(tiny_index), runtime, str(path)],
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        ready = p.stdout.readline().split()
        assert ready and ready[0] == "ready", ready
        start = int(ready[1])
        if steps_seen:
            assert start == steps_seen[-1], "the new process did not resume from the file the killed one left"
        first = [p.stdout.readline().split() for _ in range(2)]  # wait for one completed save, then a random delay
        assert first == [["begin", str(start + 1)], ["end", str(start + 1)]], first
        time.sleep(rnd.uniform(0.0, 0.4))
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        # a kill can cut the last progress line short ("beg"): keep whole "<word> <step>" lines
        lines = first + [x for x in (ln.split() for ln in p.stdout.read().splitlines())
                         if len(x) == 2 and x[1].isdigit()]
        p.stdout.close()
        ends = [int(x[1]) for x in lines if x[0] == "end"]
        begins = [int(x[1]) for x in lines if x[0] == "begin"]
        last_end = ends[-1] if ends else start
        in_flight = begins[-1] if begins and (not ends or begins[-1] > ends[-1]) else None
        inside_save += in_flight is not None
        step = load_checkpoint(path).step if path.exists() else 0
        allowed = {last_end} | ({in_flight} if in_flight is not None else set())
        assert step in allowed, (step, allowed, lines[-3:])
        steps_seen.append(step)
        leftovers = [f.name for f in path.parent.iterdir() if f.name.endswith(".tmp")]
        assert len(leftovers) <= 1, leftovers  # each new writer removes what dead ones left
    assert inside_save >= 1, "no kill landed inside a save; the test proved nothing"
    assert steps_seen[-1] > 0
    rt = runtimes.resume(path, runtime=runtime, threads=1)
    assert rt.step_count == steps_seen[-1]
    tok = np.arange(8)[None]
    assert np.isfinite(rt.step(tok, tok, tok + 1, runtimes.make_hp(1e-3, step=rt.step_count + 1)))
    print(f"\n{runtime}: {k} kills, {inside_save} inside a save; checkpoint steps after each kill: {steps_seen}")


# --------------------------------------------------------------------------- failed writes
def _tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    return r.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs when this machine lets us mount one (root); None otherwise."""
    folder = tmp_path / "disk"
    mounted = _tmpfs(folder, "4m")
    yield folder if mounted else None
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)


def _two_saves(rt, path: Path) -> None:
    tok = np.arange(8)[None]
    rt.step(tok, tok, tok + 1, runtimes.make_hp(1e-3, step=rt.step_count + 1))
    rt.save(path)


def _assert_intact(path: Path, step: int) -> None:
    assert load_checkpoint(path).step == step
    assert not [f for f in path.parent.iterdir() if f.name.endswith(".tmp")], "a temporary file was left behind"


@pytest.mark.parametrize("runtime", ["ort", "ort-training"])
def test_disk_full_during_save_keeps_previous_checkpoint(tiny_index, tmp_path, small_disk, enospc_after, runtime):
    """On a real 4 MiB tmpfs where one checkpoint fits but not a second copy beside it (else simulated)."""
    rt = runtimes.load(tiny_index, runtime=runtime, threads=1)
    folder = small_disk or tmp_path / "sim"
    folder.mkdir(exist_ok=True)
    path = folder / "checkpoint.safetensors"
    _two_saves(rt, path)
    if small_disk is None:
        enospc_after["armed"] = True
    else:  # leave less room than one more checkpoint needs
        (folder / "filler").write_bytes(b"\0" * max(0, os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
                                                     - path.stat().st_size // 2))
    with pytest.raises(OutputError, match=rf"could not write {path}: No space left on device \(ENOSPC\); "
                                          r"the previous file is intact; free some space"):
        _two_saves(rt, path)
    _assert_intact(path, 1)
    rt2 = runtimes.resume(path, runtime=runtime)
    assert rt2.step_count == 1


def test_write_under_a_regular_file_is_an_output_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=r"could not write .*file/ckpt: Not a directory \(ENOTDIR\); nothing was written"):
        write_atomic(tmp_path / "file" / "ckpt", b"data")


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    """What a SIGKILLed writer leaves (its pid no longer exists) goes at the next write; a live one's stays."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".ckpt.{dead_pid}.abc.tmp"
    live = tmp_path / f".ckpt.{os.getppid()}.def.tmp"
    other = tmp_path / f".other.{dead_pid}.ghi.tmp"
    for f in (stale, live, other):
        f.write_bytes(b"half")
    write_atomic(tmp_path / "ckpt", b"whole")
    assert (tmp_path / "ckpt").read_bytes() == b"whole"
    assert not stale.exists() and live.exists() and other.exists()


def test_checkpoint_file_mode_follows_umask(tmp_path):
    write_atomic(tmp_path / "f", b"x")
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o666 & ~files_mod._UMASK
