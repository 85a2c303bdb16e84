"""The portable graphs on ONNX engines other than ONNX Runtime, as shipped.

For each engine: forward.onnx and 10 chained train_step.onnx steps (every ``new.*`` output fed
back, clipping at 1.8, which most steps exceed) of a freshly built tiny folder, the files as
the builder wrote them, against the PyTorch oracle (tests/oracle): logits 1e-5 absolute, losses
1e-5 absolute, gradient norms 1e-5 relative, parameters 1e-4 relative per tensor (b_k, whose
exact gradient is zero, to its drift bound; see tests/parity_util.py).

The engines live in .venv-engines (``make test`` creates it from tests/engines/requirements.txt)
and each runs in its own process through tests/engines/run_engine.py. tinygrad's CPU backend
compiles its kernels with clang (``make test`` installs it: scripts/install_debian.sh).

An engine that fails on a defect of its own is marked ``xfail(strict=True)``, and each defect
keeps a minimal repro here (a few-node model built in the test, its expected output from
onnx's ReferenceEvaluator), also strict: when the engine is fixed the repro passes, which fails
the suite (XPASS strict) until the mark is removed and the README's engine matrix updated.

The ``openvino`` runtime (runtimes/openvino.py, in .venv) is held to the parity suite's
tolerances in tests/test_parity.py; its checkpoints and diverged steps are checked at the end here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import runtimes
from tests.engines import feeds as F
from tests.parity_util import compare_state, report

ROOT = Path(__file__).resolve().parents[1]
ENGINES_PY = ROOT / ".venv-engines" / "bin" / "python"
DRIVER = ROOT / "tests" / "engines" / "run_engine.py"

ONNX2TORCH_GAPS = ("onnx2torch 1.5.15 (its latest release) has no converters past about opset 17: none for "
                   "Shape-19, Reshape-19, Cast-19, Constant-19, ConstantOfShape-20, ReduceMean/ReduceProd/"
                   "ReduceSumSquare-18, ScatterElements-16/18 (reduction='add'), Gelu-20")
# (engine, label mode): dense labels (another loss and backward) on the engines that compile in a second
CASES = [
    ("openvino", "index"),
    ("tract", "index"),
    ("tvm", "index"),
    ("tinygrad", "index"),
    pytest.param("onnx2torch", "index", marks=pytest.mark.xfail(strict=True, reason=ONNX2TORCH_GAPS)),
    ("openvino", "dense"),
    ("tract", "dense"),
]


@pytest.fixture(scope="module")
def engines_py() -> Path:
    assert ENGINES_PY.exists(), (
        f"{ENGINES_PY} is missing: `make test` creates it (pip install -r tests/engines/requirements.txt "
        "in .venv-engines)")
    return ENGINES_PY


def run_driver(engines_py: Path, engine: str, target: Path, feeds: Path, out: Path, tmp: Path) -> dict:
    env = dict(os.environ)
    if engine == "tinygrad":
        cc = env.get("CC", "clang")
        assert shutil.which(cc), f"tinygrad's CPU backend needs {cc}: run `sh scripts/install_debian.sh clang clang` (make test does)"
        # its own kernel cache: one left by another compiler in ~/.cache/tinygrad can hold objects it cannot load
        env.update(DEV="CPU", CACHEDB=str(tmp / "tinygrad-cache.db"))
    proc = subprocess.run([str(engines_py), str(DRIVER), engine, str(target), str(feeds), str(out)],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{engine} failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


_shipped: dict = {}


def shipped_folder(folder: Path, tmp: Path) -> dict:
    """The folder, its feeds file, the oracle's results, and the sha256 of every file as built."""
    if folder not in _shipped:
        manifest = json.loads((folder / "manifest.json").read_text())
        _shipped[folder] = {"folder": folder, "feeds": F.write_feeds(folder, tmp / f"feeds-{folder.name}.npz"),
                            "oracle": F.oracle(folder), "files": manifest["files"]}
    return _shipped[folder]


@pytest.mark.parametrize("engine, mode", CASES)
def test_engine_runs_the_shipped_graphs(engine, mode, engines_py, tiny_index, tiny_dense, tmp_path_factory, tmp_path):
    shipped = shipped_folder(tiny_index if mode == "index" else tiny_dense, tmp_path_factory.getbasetemp())
    out = tmp_path / "out.npz"
    info = run_driver(engines_py, engine, shipped["folder"], shipped["feeds"], out, tmp_path)
    got, want = np.load(out), shipped["oracle"]
    name = f"{engine} {info['version']}, {mode} labels"
    report(f"{name}: forward.onnx logits vs torch (absolute)",
           {"logits (B=3, T=context)": float(np.abs(got["logits"] - want["logits"]).max())}, 1e-5)
    report(f"{name}: {F.STEPS} chained train_step.onnx losses vs torch (absolute)",
           {f"step {i + 1}": abs(a - b) for i, (a, b) in enumerate(zip(got["losses"], want["losses"]))}, 1e-5)
    assert sum(n > F.CLIP for n in want["grad_norms"]) >= F.STEPS // 2  # clipping is exercised
    report(f"{name}: gradient norms vs torch (relative)",
           {f"step {i + 1}": abs(a - b) / b for i, (a, b) in enumerate(zip(got["grad_norms"], want["grad_norms"]))},
           1e-5)
    params = {k[2:]: got[k] for k in got.files if k.startswith("p.")}
    compare_state(f"{name}: parameters after {F.STEPS} steps", params, want["params"], 1e-4, F.LR, F.STEPS)
    # as shipped: the files the engine read are the ones the builder wrote
    for f in ("forward.onnx", "train_step.onnx"):
        assert hashlib.sha256((shipped["folder"] / f).read_bytes()).hexdigest() == shipped["files"][f]["sha256"], f


# --- minimal repros of the engines' defects ------------------------------------------------

def _shape19():
    g = helper.make_graph([helper.make_node("Shape", ["x"], ["y"])], "shape19",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.INT64, [2])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)]), {"x": np.ones((2, 3), np.float32)}


def _scatter_add16():
    g = helper.make_graph([helper.make_node("ScatterElements", ["d", "i", "u"], ["y"], axis=0, reduction="add")],
                          "scatter_add16",
                          [helper.make_tensor_value_info("d", TensorProto.FLOAT, [3, 2]),
                           helper.make_tensor_value_info("i", TensorProto.INT64, [3, 2]),
                           helper.make_tensor_value_info("u", TensorProto.FLOAT, [3, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2])])
    feeds = {"d": np.zeros((3, 2), np.float32), "i": np.array([[0, 1], [2, 1], [0, 1]], np.int64),
             "u": np.arange(1, 7, dtype=np.float32).reshape(3, 2)}  # repeated indices: the adds accumulate
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 16)]), feeds


def _gelu20():
    g = helper.make_graph([helper.make_node("Gelu", ["x"], ["y"], approximate="tanh")], "gelu20",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)]), {"x": np.linspace(-2, 2, 5, dtype=np.float32)}


REPROS = [
    pytest.param("onnx2torch", _shape19, id="onnx2torch-Shape-19", marks=pytest.mark.xfail(
        strict=True, reason="onnx2torch 1.5.15: no converter for Shape-19 (opset >= 19), which every graph here uses")),
    pytest.param("onnx2torch", _scatter_add16, id="onnx2torch-ScatterElements-16-add", marks=pytest.mark.xfail(
        strict=True, reason="onnx2torch 1.5.15: no ScatterElements-16 converter (reduction='add'), the embedding "
                            "and cross-entropy backward")),
    pytest.param("onnx2torch", _gelu20, id="onnx2torch-Gelu-20", marks=pytest.mark.xfail(
        strict=True, reason="onnx2torch 1.5.15: no Gelu converter (opset 20)")),
]


@pytest.mark.parametrize("engine, build", REPROS)
def test_engine_defect_repro(engine, build, engines_py, tmp_path):
    model, feeds = build()
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    want = ReferenceEvaluator(model).run(None, feeds)[0]  # the model is valid and this is what it means
    onnx.save(model, tmp_path / "repro.onnx")
    np.savez(tmp_path / "feeds.npz", **feeds)
    run_driver(engines_py, engine, tmp_path / "repro.onnx", tmp_path / "feeds.npz", tmp_path / "out.npz", tmp_path)
    got = np.load(tmp_path / "out.npz")["y"]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


# --- the openvino runtime: checkpoints ------------------------------------------------------

def test_openvino_runtime_checkpoint_round_trip(tiny_index, tmp_path):
    """Save and resume through the common checkpoint: parameters, moments and step count come back
    exactly and the next step matches; an `ort` checkpoint resumes on openvino too."""
    _, train = F.data(tiny_index, 4)
    hp = [runtimes.make_hp(F.LR, *F.BETAS, F.EPS, F.WD, step=t + 1) for t in range(4)]
    rt = runtimes.load(tiny_index, runtime="openvino")
    for t in range(3):
        rt.step(*train[t], hp[t], F.CLIP)
    rt.save(tmp_path / "ov.ckpt")
    back = runtimes.resume(tmp_path / "ov.ckpt")
    assert back.name == "openvino" and back.step_count == 3
    for a, b in ((rt.parameters(), back.parameters()), *zip(rt.moments(), back.moments())):
        assert all(np.array_equal(a[n], b[n]) for n in a)
    assert back.step(*train[3], hp[3], F.CLIP) == rt.step(*train[3], hp[3], F.CLIP)
    assert back.last_grad_norm == rt.last_grad_norm

    ort = runtimes.load(tiny_index, runtime="ort")
    for t in range(3):
        ort.step(*train[t], hp[t], F.CLIP)
    ort.save(tmp_path / "ort.ckpt")
    moved = runtimes.resume(tmp_path / "ort.ckpt", runtime="openvino")
    assert moved.step_count == 3
    assert abs(moved.step(*train[3], hp[3], F.CLIP) - ort.step(*train[3], hp[3], F.CLIP)) < 1e-5


def test_openvino_runtime_diverged_step_changes_nothing(tiny_index):
    """The new state is written into the spare set, committed only for a finite loss."""
    _, train = F.data(tiny_index, 2)
    rt = runtimes.load(tiny_index, runtime="openvino")
    rt.step(*train[0], runtimes.make_hp(F.LR, step=1))
    rt._cur["lnf_g"][0][0] = np.nan  # a poisoned parameter: the next loss is NaN
    before, (m, v) = rt.parameters(), rt.moments()
    with pytest.raises(runtimes.TrainingDiverged, match="not applied"):
        rt.step(*train[1], runtimes.make_hp(F.LR, step=2))
    assert rt.step_count == 1
    after, (m2, v2) = rt.parameters(), rt.moments()
    for a, b in ((before, after), (m, m2), (v, v2)):
        assert all(np.array_equal(a[n], b[n], equal_nan=True) for n in a)
