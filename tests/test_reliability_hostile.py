"""Hostile or careless inputs that used to escape as tracebacks or read outside the folder.

Each is refused with this package's own error (exit 2 and one line from a CLI)
before any session exists, and leaves the state as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from safetensors.numpy import load_file, save_file

import runtimes
from runtimes.checkpoint import load_checkpoint, save_checkpoint
from runtimes.errors import ArtifactError, CheckpointError, InputError, OutOfMemory

ROOT = Path(__file__).resolve().parents[1]
RUNTIMES = ["ort", "ort-training", "reference"]


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def rehash(folder: Path, edit=None) -> None:
    """Rewrite manifest.json's file hashes (and apply ``edit``), as a forger would."""
    m = json.loads((folder / "manifest.json").read_text())
    for name in m["files"]:
        data = (folder / name).read_bytes()
        m["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    if edit:
        edit(m)
    (folder / "manifest.json").write_text(json.dumps(m))


# --------------------------------------------------------------------------- external data
def make_external(model: onnx.ModelProto, location: str) -> str:
    """Point the first tensor-valued Constant (or initializer) at ``location`` as external data."""
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node for a in n.attribute if a.HasField("t")]
    t = next(t for t in tensors if t.raw_data or t.float_data)
    n = len(t.raw_data) or 4 * len(t.float_data)
    t.ClearField("raw_data")
    t.ClearField("float_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(n))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t.name


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("model_file", ["train_step.onnx", "eval_model.onnx", "training_model.onnx"])
@pytest.mark.parametrize("location", ["../../../../../../etc/passwd", "/etc/passwd", "weights.bin"])
def test_models_with_external_data_are_refused_before_any_session(tiny_index, tmp_path, runtime, model_file, location):
    art = copy_folder(tiny_index, tmp_path / "art")
    model = onnx.load(str(art / model_file), load_external_data=False)
    make_external(model, location)
    (art / model_file).write_bytes(model.SerializeToString())
    (art / "weights.bin").write_bytes(b"\0" * (1 << 16))
    rehash(art)
    with pytest.raises(ArtifactError, match="external data") as e:
        runtimes.load(art, runtime=runtime)
    assert location in str(e.value) and model_file in str(e.value)


def test_external_data_refused_from_the_cli_with_one_line(tiny_index, tmp_path):
    art = copy_folder(tiny_index, tmp_path / "art")
    model = onnx.load(str(art / "train_step.onnx"), load_external_data=False)
    make_external(model, "/etc/passwd")
    (art / "train_step.onnx").write_bytes(model.SerializeToString())
    rehash(art)
    p = subprocess.run([sys.executable, "-m", "runtimes", "train", "--artifacts", str(art), "--runtime", "ort",
                        "--out", str(tmp_path / "run"), "--steps", "1", "--no-progress"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "/etc/passwd" in p.stderr


# --------------------------------------------------------------------------- swapped models
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_models_from_another_build_are_refused_at_load(tiny_index, tiny_dense, tmp_path, runtime):
    art = copy_folder(tiny_index, tmp_path / "art")
    for f in ("train_step.onnx", "eval_model.onnx", "forward.onnx", "training_model.onnx", "optimizer_model.onnx"):
        (art / f).write_bytes((tiny_dense / f).read_bytes())
    rehash(art)
    with pytest.raises(ArtifactError, match="labels|differ from manifest"):
        runtimes.load(art, runtime=runtime)


def test_models_and_manifest_models_both_rewritten_still_disagree_with_the_label_mode(tiny_index, tiny_dense, tmp_path):
    art = copy_folder(tiny_index, tmp_path / "art")
    dense_models = json.loads((tiny_dense / "manifest.json").read_text())["models"]
    for f in dense_models:
        (art / f).write_bytes((tiny_dense / f).read_bytes())
    rehash(art, lambda m: m.update(models=dense_models))
    with pytest.raises(ArtifactError, match="config.labels is 'index'"):
        runtimes.load(art, runtime="ort")


# --------------------------------------------------------------------------- deep JSON
DEEP = "[" * 100_000 + "]" * 100_000


def test_deeply_nested_manifest_is_an_artifact_error(tiny_index, tmp_path):
    art = copy_folder(tiny_index, tmp_path / "art")
    text = (art / "manifest.json").read_text()
    (art / "manifest.json").write_text(text[:-1] + ', "extra": ' + DEEP + "}")
    with pytest.raises(ArtifactError, match="nests deeper"):
        runtimes.load(art, runtime="ort")


def test_deeply_nested_checkpoint_extra_is_a_checkpoint_error(tiny_index, tmp_path):
    rt = runtimes.load(tiny_index, runtime="ort")
    rt.save(tmp_path / "c.safetensors")
    tensors = load_file(str(tmp_path / "c.safetensors"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "c.safetensors"), "np") as f:
        meta = f.metadata()
    meta["extra"] = DEEP
    save_file(tensors, str(tmp_path / "deep.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="nests deeper"):
        load_checkpoint(tmp_path / "deep.safetensors")
    p = subprocess.run([sys.executable, "-m", "runtimes", "train", "--artifacts", str(tiny_index), "--runtime", "ort",
                        "--out", str(tmp_path / "run"), "--steps", "2", "--no-progress",
                        "--resume", str(tmp_path / "deep.safetensors")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "nests deeper" in p.stderr, p.stderr


def test_deeply_nested_log_line_does_not_stop_a_resume(tiny_index, tmp_path):
    from runtimes.train import TrainOptions, train

    data = tmp_path / "d.txt"
    data.write_text("def f(x):\n    return x\n" * 200)
    opts = dict(artifacts=str(tiny_index), runtime="ort", data=str(data), out=str(tmp_path / "run"), batch=1, seq=8,
                eval_batches=1, sample_bytes=0, progress=False, checkpoint_every=2, threads=1)
    train(TrainOptions(steps=2, **opts), echo=lambda *a: None)
    with open(tmp_path / "run" / "log.jsonl", "a") as f:
        f.write(DEEP + "\n")
    s = train(TrainOptions(steps=4, resume=str(tmp_path / "run" / "checkpoint.safetensors"), **opts), echo=lambda *a: None)
    assert s["steps"] == 4


# --------------------------------------------------------------------------- values Python itself trips over
def test_make_hp_beta_rounding_to_one_in_float32():
    for kw in ({"beta1": 0.9999999999}, {"beta2": 0.99999999999}):
        with pytest.raises(InputError, match="float32"):
            runtimes.make_hp(1e-3, **kw)


@pytest.mark.parametrize("extra", [{"x": object()}, {"x": float("nan")}, {"x": {1, 2}}])
def test_save_with_unserialisable_extra_is_an_input_error_and_writes_nothing(tiny_index, tmp_path, extra):
    rt = runtimes.load(tiny_index, runtime="reference")
    with pytest.raises(InputError, match="plain JSON"):
        rt.save(tmp_path / "c.safetensors", extra=extra)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_ort_training_blob_is_a_checkpoint_error(tiny_index, tmp_path):
    rt = runtimes.load(tiny_index, runtime="ort-training")
    rt.save(tmp_path / "c.safetensors")
    ck = load_checkpoint(tmp_path / "c.safetensors")
    for i, damage in enumerate((lambda b: b[: len(b) // 3], lambda b: bytes(x ^ 0x5A for x in b), lambda b: b"\0" * 64)):
        ck.native = damage(ck.native)  # saved with a fresh, matching sha256: only validation can tell
        save_checkpoint(tmp_path / f"bad{i}.safetensors", ck)
        with pytest.raises(CheckpointError):
            runtimes.resume(tmp_path / f"bad{i}.safetensors", artifacts=tiny_index)
        ck = load_checkpoint(tmp_path / "c.safetensors")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_masked_arrays_are_refused_and_change_nothing(tiny_index, runtime):
    rt = runtimes.load(tiny_index, runtime=runtime)
    before = rt.parameters()
    tokens = np.ma.masked_array(np.zeros((1, 8), np.int64), mask=[[True] + [False] * 7])
    tokens.data[0, 0] = -1  # what the mask hides: an id out of range
    pos = np.arange(8, dtype=np.int64)[None]
    labels = np.zeros((1, 8), np.int64)
    hp = runtimes.make_hp(1e-2, step=1)
    for args, name in (((tokens, pos, labels, hp), "tokens"), ((labels, np.ma.masked_array(pos), labels, hp), "positions"),
                       ((labels, pos, np.ma.masked_array(labels), hp), "labels"), ((labels, pos, labels, np.ma.masked_array(hp)), "hp")):
        with pytest.raises(InputError, match=f"(?i){name}.*masked"):
            rt.step(*args)
    assert rt.step_count == 0
    assert all(np.array_equal(before[k], v) for k, v in rt.parameters().items())


# --------------------------------------------------------------------------- out of memory
OOM_SCRIPT = textwrap.dedent("""
    import resource, sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    import runtimes
    rt = runtimes.load(sys.argv[2], runtime=sys.argv[3], threads=1)
    before = rt.parameters()
    resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[4]) << 20, resource.RLIM_INFINITY))
    b, t = 20000, 64
    ids = np.zeros((b, t), np.int64)
    pos = np.broadcast_to(np.arange(t, dtype=np.int64), (b, t)).copy()
    try:
        rt.step(ids, pos, ids, runtimes.make_hp(1e-2, step=1))
    except runtimes.OutOfMemory as e:
        print("OOM:", e)
    else:
        print("no error")
    small = (ids[:1, :8].copy(), pos[:1, :8].copy(), ids[:1, :8].copy())
    same = all(np.array_equal(before[k], v) for k, v in rt.parameters().items())
    print("unchanged:", same and rt.step_count == 0)
    print("then:", np.isfinite(rt.step(*small, runtimes.make_hp(1e-2, step=1))), rt.step_count)
""")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_batch_that_does_not_fit_is_a_clear_error_and_changes_nothing(tiny_index, tmp_path, runtime):
    from runtimes.ort_env import import_onnxruntime  # noqa: F401  (imported by the script)

    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    script = tmp_path / "oom.py"
    script.write_text(OOM_SCRIPT)
    p = subprocess.run([sys.executable, str(script), str(ROOT), str(tiny_index), runtime, "3000"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "OOM:" in p.stdout and "did not fit in memory" in p.stdout and "20000x64" in p.stdout, p.stdout
    assert "unchanged: True" in p.stdout and "then: True 1" in p.stdout, p.stdout
