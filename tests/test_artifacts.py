"""The artifact folder: every file present, hashed, checked, loadable in onnxruntime 1.19."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from safetensors.numpy import load_file

import runtimes
from graphgen.artifacts import sha256_file
from graphgen.config import GPT2Config, param_specs
from graphgen.init import init_weights
from runtimes.artifacts import load_artifacts
from runtimes.errors import ArtifactError

EXPECTED = {"training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint",
            "forward.onnx", "decoder.onnx", "weights.safetensors", "manifest.json"}


def test_folder_contents_and_hashes(tiny_index):
    names = {p.name for p in tiny_index.iterdir()}
    assert EXPECTED <= names
    m = json.loads((tiny_index / "manifest.json").read_text())
    assert set(m["files"]) == names - {"manifest.json"}
    for name, info in m["files"].items():
        assert sha256_file(tiny_index / name) == info["sha256"]
        assert (tiny_index / name).stat().st_size == info["bytes"]


def test_manifest_describes_config_params_io(tiny_index):
    m = json.loads((tiny_index / "manifest.json").read_text())
    cfg = GPT2Config.preset("tiny")
    for k in ("vocab", "context", "d_model", "n_heads", "d_ff", "n_layers", "seed", "init", "labels",
              "beta1", "beta2", "eps", "weight_decay"):
        assert m["config"][k] == getattr(cfg, k), k
    assert [(p["name"], tuple(p["shape"])) for p in m["parameters"]] == param_specs(cfg)
    assert m["hp"]["layout"] == ["lr", "beta1", "beta2", "eps", "weight_decay", "beta1h", "beta2h"]
    assert m["opset"] == 20 and m["training_set_opset"] == 17 and m["ir_version"] == 10
    opsets = {f: {o.version for o in onnx.load(str(tiny_index / f), load_external_data=False).opset_import
                  if o.domain in ("", "ai.onnx")} for f in ("train_step.onnx", "forward.onnx", "training_model.onnx")}
    assert opsets == {"train_step.onnx": {20}, "forward.onnx": {20}, "training_model.onnx": {17}}
    fwd = m["models"]["forward.onnx"]
    assert [i["name"] for i in fwd["inputs"][:2]] == ["tokens", "positions"]
    assert fwd["inputs"][0] == {"name": "tokens", "dtype": "int64", "shape": ["batch", "seq"]}
    assert fwd["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", "seq", 256]}]
    assert m["models"]["eval_model.onnx"]["outputs"][0] == {"name": "loss", "dtype": "float32", "shape": []}
    assert "onnx" in m["tools"] and "onnxscript" in m["tools"]


def test_weights_are_the_init(tiny_index):
    w = load_file(str(tiny_index / "weights.safetensors"))
    ref = init_weights(GPT2Config.preset("tiny"))
    assert list(ref) == [p for p, _ in param_specs(GPT2Config.preset("tiny"))]
    assert all(np.array_equal(w[k], ref[k]) for k in ref)


PORTABLE = ["forward.onnx", "eval_model.onnx", "train_step.onnx"]  # plain ONNX, any runtime


@pytest.mark.parametrize("name", PORTABLE + ["training_model.onnx", "optimizer_model.onnx"])
def test_models_check_and_are_ir10(tiny_index, name):
    model = onnx.load(str(tiny_index / name))
    assert model.ir_version == 10
    # full_check runs strict shape inference; the training-set models use com.microsoft
    # ops whose schemas the onnx package does not know
    onnx.checker.check_model(model, full_check=name in PORTABLE)
    if name in PORTABLE:
        assert {n.domain for n in model.graph.node} <= {""}
        assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
        ort.InferenceSession(str(tiny_index / name), providers=["CPUExecutionProvider"])


def test_builder_and_runners_never_import_torch(tiny_index, tmp_path):
    """graphgen and runtimes work with torch made unimportable (it is a test-only dependency)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from graphgen.artifacts import build_artifacts\n"
        "from graphgen.config import GPT2Config\n"
        "import numpy as np, runtimes\n"
        f"build_artifacts(GPT2Config.preset('tiny', n_layers=1), {str(tmp_path / 'a')!r}, log=lambda m: None)\n"
        "tok = np.zeros((1, 8), np.int64); pos = np.arange(8)[None]\n"
        "for name in ('ort-training', 'ort', 'reference'):\n"
        f"    rt = runtimes.load({str(tmp_path / 'a')!r}, runtime=name)\n"
        "    rt.step(tok, pos, tok, runtimes.make_hp(1e-3, step=1))\n"
        "assert 'torch' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]


def test_optimizer_is_pytorch_adamw(tiny_index):
    model = onnx.load(str(tiny_index / "optimizer_model.onnx"))
    (node,) = [n for n in model.graph.node if n.op_type == "AdamWOptimizer"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["adam_mode"] == 0 and attrs["correct_bias"] == 1
    assert attrs["alpha"] == pytest.approx(0.9) and attrs["beta"] == pytest.approx(0.999)
    assert attrs["epsilon"] == pytest.approx(1e-8) and attrs["weight_decay"] == pytest.approx(0.01)


def test_training_set_loads_in_training_api(tiny_index):
    rt = runtimes.load(tiny_index, runtime="ort-training")
    assert set(rt.parameters()) == {p for p, _ in param_specs(GPT2Config.preset("tiny"))}


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_file_is_named(tiny_index, tmp_path):
    d = _copy(tiny_index, tmp_path / "a")
    (d / "eval_model.onnx").unlink()
    with pytest.raises(ArtifactError, match="eval_model.onnx"):
        load_artifacts(d)


def test_corrupted_file_is_named(tiny_index, tmp_path):
    d = _copy(tiny_index, tmp_path / "a")
    data = bytearray((d / "checkpoint").read_bytes())
    data[100] ^= 0xFF
    (d / "checkpoint").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checkpoint: sha256 differs"):
        load_artifacts(d)


def test_truncated_file_is_named(tiny_index, tmp_path):
    d = _copy(tiny_index, tmp_path / "a")
    data = (d / "weights.safetensors").read_bytes()
    (d / "weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="weights.safetensors.*truncated"):
        load_artifacts(d)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(format_version=99), "format_version 99"),
    (lambda m: m.update(format="something-else"), "not a gpt2-onnx-artifacts manifest"),
    (lambda m: m.pop("parameters"), "missing key 'parameters'"),
])
def test_foreign_manifest(tiny_index, tmp_path, edit, match):
    d = _copy(tiny_index, tmp_path / "a")
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=match):
        load_artifacts(d)


def test_not_a_folder(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifacts(tmp_path / "nope")
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load_artifacts(tmp_path)


def test_build_without_onnxruntime_training(tiny_index, tmp_path, monkeypatch, capsys):
    """Where onnxruntime-training cannot be installed (an environment with onnxruntime-gpu:
    both are the `onnxruntime` package) the build still makes a folder every other runtime
    uses; the ort-training runtime refuses it naming why, before opening anything."""
    import graphgen.artifacts as ga
    from graphgen.__main__ import main as build_main

    monkeypatch.setattr(ga, "training_set_available", lambda: False)
    out = tmp_path / "no-set"
    assert build_main(["build", "--config", "tiny", "--out", str(out)]) == 0
    assert "training set skipped: onnxruntime-training is not installed" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert m["training_set"] == []
    names = {p.name for p in out.iterdir()}
    assert not names & {"training_model.onnx", "optimizer_model.onnx", "checkpoint"}
    assert "eval_model.onnx" in names
    full = json.loads((tiny_index / "manifest.json").read_text())
    assert m["models"]["eval_model.onnx"] == full["models"]["eval_model.onnx"]

    tok = np.arange(2 * 16, dtype=np.int64).reshape(2, 16) % 256
    pos = np.tile(np.arange(16, dtype=np.int64), (2, 1))
    lab = np.roll(tok, -1, axis=1)
    for name in ("ort", "reference"):
        a = runtimes.load(out, runtime=name, threads=2)
        b = runtimes.load(tiny_index, runtime=name, threads=2)
        assert a.loss(tok, pos, lab) == pytest.approx(b.loss(tok, pos, lab), rel=1e-6)
    with pytest.raises(ArtifactError, match="built without ONNX Runtime's training set.*--runtime ort"):
        runtimes.load(out, runtime="ort-training")
