"""build --recompute-attention: the backward recomputes P = softmax(q k^T s + mask) from q
and k instead of reading the forward's; the same numbers, bit for bit."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import runtimes
from graphgen.artifacts import build_artifacts
from graphgen.config import GPT2Config
from graphgen.recompute import recompute_attention
from tests.parity_util import batches


@pytest.fixture(scope="module")
def tiny_recompute(tmp_path_factory):
    out = tmp_path_factory.mktemp("recompute") / "tiny"
    build_artifacts(GPT2Config.preset("tiny"), out, log=lambda m: None, recompute_attention=True)
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


@pytest.mark.parametrize("runtime", ["ort", "reference"])
def test_recomputed_steps_equal_kept_ones_bit_for_bit(tiny_recompute, tiny_index, runtime):
    a = runtimes.load(tiny_index, runtime=runtime, threads=2)
    b = runtimes.load(tiny_recompute, runtime=runtime, threads=2)
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
