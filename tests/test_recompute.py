"""build --recompute: the backward recomputes P = softmax(q k^T s + mask) from q and k,
and each GELU output from its input, instead of reading the forward's; the same numbers,
bit for bit. By default (auto) a build recomputes both from a context of 1,024 up."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import runtimes
from graphgen.artifacts import build_artifacts
from graphgen.config import GPT2Config
from graphgen.recompute import AUTO_CONTEXT, default_recompute, recompute_attention
from tests.parity_util import batches


@pytest.fixture(scope="module")
def tiny_recompute(tmp_path_factory):
    out = tmp_path_factory.mktemp("recompute") / "tiny"
    build_artifacts(GPT2Config.preset("tiny"), out, log=lambda m: None, recompute_attention=True)
    return out


@pytest.fixture(scope="module")
def tiny_recompute_all(tmp_path_factory):
    out = tmp_path_factory.mktemp("recompute_all") / "tiny"
    build_artifacts(GPT2Config.preset("tiny"), out, log=lambda m: None, recompute=["gelu", "attention"])
    return out


def _backward_reads(folder, op_type):
    """Per step graph: whether a backward node reads a forward ``op_type`` output."""
    out = {}
    for f in ("train_step.onnx", "grad_step.onnx"):
        g = onnx.load(str(folder / f)).graph
        made = {n.output[0] for n in g.node if n.op_type == op_type and not n.name.startswith(("bw/", "rc/"))}
        out[f] = bool({x for n in g.node if n.name.startswith("bw/") for x in n.input} & made)
    return out


def test_no_backward_node_reads_a_forward_softmax(tiny_recompute, tiny_index):
    for folder, kept in ((tiny_index, True), (tiny_recompute, False)):
        for f in ("train_step.onnx", "grad_step.onnx"):
            g = onnx.load(str(folder / f)).graph
            probs = {n.output[0] for n in g.node if n.op_type == "Softmax" and not n.name.startswith(("bw/", "rc/"))}
            read = {x for n in g.node if n.name.startswith("bw/") for x in n.input} & probs
            assert bool(read) == kept, (folder, f)
    m = json.loads((tiny_recompute / "manifest.json").read_text())
    assert m["train_step"]["recompute"] == ["attention"] and m["train_step"]["in_place"] is True
    assert json.loads((tiny_index / "manifest.json").read_text())["train_step"]["recompute"] == []


def test_gelu_outputs_are_recomputed_too(tiny_recompute_all, tiny_recompute, tiny_index):
    assert all(_backward_reads(tiny_index, "Gelu").values())
    assert all(_backward_reads(tiny_recompute, "Gelu").values())  # attention alone keeps them
    assert not any(_backward_reads(tiny_recompute_all, "Gelu").values())
    assert not any(_backward_reads(tiny_recompute_all, "Softmax").values())
    m = json.loads((tiny_recompute_all / "manifest.json").read_text())
    assert m["train_step"]["recompute"] == ["attention", "gelu"] and m["train_step"]["in_place"] is True


def test_auto_recomputes_from_a_long_context():
    assert default_recompute(AUTO_CONTEXT) == ["attention", "gelu"] == default_recompute(4 * AUTO_CONTEXT)
    assert default_recompute(AUTO_CONTEXT - 1) == [] == default_recompute(GPT2Config.preset("tiny").context)
    assert default_recompute(GPT2Config.preset("gpt2").context) == ["attention", "gelu"]


@pytest.mark.parametrize("runtime", ["ort", "reference"])
@pytest.mark.parametrize("which", ["attention", "all"])
def test_recomputed_steps_equal_kept_ones_bit_for_bit(tiny_recompute, tiny_recompute_all, tiny_index, runtime,
                                                      which):
    a = runtimes.load(tiny_index, runtime=runtime, threads=2)
    b = runtimes.load(tiny_recompute if which == "attention" else tiny_recompute_all, runtime=runtime, threads=2)
    tb = batches(a.art.config, 4, batch=4, seq=32, seed=5)
    for t, batch in enumerate(tb[:2], start=1):
        hp = runtimes.make_hp(1e-2, step=t)
        assert a.step(*batch, hp, 1.0) == b.step(*batch, hp, 1.0)
    hp = runtimes.make_hp(1e-2, step=3)
    assert a.step_accumulated(tb[2:], hp, 1.0) == b.step_accumulated(tb[2:], hp, 1.0)
    pa, pb = a.parameters(), b.parameters()
    assert all(np.array_equal(pa[n], pb[n]) for n in pa)


def test_a_softmax_not_fed_by_a_matmul_chain_is_refused():
    f = TensorProto.FLOAT
    nodes = [helper.make_node("Exp", ["x"], ["e"]), helper.make_node("Softmax", ["e"], ["p"]),
             helper.make_node("Mul", ["p", "x"], ["bw/g"], name="bw/n_Mul")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, [2, 2])],
                          [helper.make_tensor_value_info("bw/g", f, [2, 2])])
    with pytest.raises(ValueError, match="reaches Exp, not the MatMul of an attention score"):
        recompute_attention(helper.make_model(g))


@pytest.mark.parametrize("args, message", [
    (["--recompute", "softmax"], "--recompute 'softmax': give auto, none, or a comma-separated list of attention, gelu"),
    (["--recompute", ""], "give auto, none, or a comma-separated list"),
    (["--recompute", "none", "--recompute-attention"], "--recompute-attention is --recompute attention"),
])
def test_build_refuses_a_bad_recompute_list(tmp_path, args, message):
    import subprocess
    import sys

    out = tmp_path / "art"
    p = subprocess.run([sys.executable, "-m", "graphgen", "build", "--config", "tiny", "--out", str(out), *args],
                       capture_output=True, text=True)
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not out.exists()


def test_build_recompute_none_and_a_list(tmp_path):
    import subprocess
    import sys

    for arg, want in (("none", []), ("gelu", ["gelu"]), ("gelu,attention", ["attention", "gelu"])):
        out = tmp_path / arg.replace(",", "_")
        subprocess.run([sys.executable, "-m", "graphgen", "build", "--config", "tiny", "--n-layers", "1", "--out",
                        str(out), "--recompute", arg], check=True, capture_output=True)
        assert json.loads((out / "manifest.json").read_text())["train_step"]["recompute"] == want
