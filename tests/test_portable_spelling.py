"""The portable graphs (train_step.onnx, grad_step.onnx, apply_step.onnx, forward.onnx, decoder.onnx) keep
to ops and forms every ONNX engine runs as shipped, not only ONNX Runtime; the training set keeps what
onnxruntime-training's gradient builder needs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

import runtimes
from tests.parity_util import batches

PORTABLE = ("train_step.onnx", "grad_step.onnx", "apply_step.onnx", "forward.onnx", "decoder.onnx")
BANNED_OPS = {"Range", "Size"}  # Range with a limit from Shape defeats some engines; Size is a host int in one
# ops whose input at this position is a list of axes
AXES_INPUT = {"Unsqueeze": 1, "Squeeze": 1, "Slice": 3, "ReduceMean": 1, "ReduceSum": 1, "ReduceMax": 1,
              "ReduceMin": 1, "ReduceProd": 1, "ReduceSumSquare": 1, "ReduceL1": 1, "ReduceL2": 1,
              "ReduceLogSum": 1, "ReduceLogSumExp": 1}
AXIS_ATTRS = {"axis", "axes", "start", "end"}  # Shape's start/end are axes too


def _load(folder, name) -> onnx.ModelProto:
    return onnx.load(str(folder / name))


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    vals = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    vals[n.output[0]] = numpy_helper.to_array(a.t)
                elif a.name in ("value_int", "value_ints"):
                    vals[n.output[0]] = np.array(onnx.helper.get_attribute_value(a))
    return vals


def _problems(model: onnx.ModelProto) -> list[str]:
    consts = _constants(model)
    out = []
    for n in model.graph.node:
        where = f"{n.op_type} {n.name!r}"
        if n.op_type in BANNED_OPS:
            out.append(f"{where}: op {n.op_type}")
        if n.op_type == "LayerNormalization" and len([o for o in n.output if o]) > 1:
            out.append(f"{where}: declares {len(n.output)} outputs (only Y is portable)")
        for a in n.attribute:
            if a.name in AXIS_ATTRS:
                v = onnx.helper.get_attribute_value(a)
                if np.any(np.asarray(v) < 0):
                    out.append(f"{where}: attribute {a.name}={v}")
        k = AXES_INPUT.get(n.op_type)
        if k is not None and len(n.input) > k and n.input[k]:
            axes = consts.get(n.input[k])
            if axes is None:
                out.append(f"{where}: axes input {n.input[k]!r} is not a constant")
            elif np.any(axes < 0):
                out.append(f"{where}: axes {axes.tolist()}")
    return out


@pytest.mark.parametrize("name", PORTABLE)
def test_portable_graphs_use_only_portable_forms(tiny_artifacts, name):
    model = _load(tiny_artifacts, name)
    assert model.graph.node, name
    assert _problems(model) == []
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}


def test_cross_entropy_backward_stays_fused(tiny_index):
    """The loss is logsumexp(rows) - rows[label]: the rows' cotangent is softmax(rows) times
    the loss's cotangent, with the label's entries scattered into it (one ScatterElements),
    not a dense (B*T, vocab) zeros + scatter + Sum; and no LogSoftmax output is kept beside
    the rows. The dim hint on the 2-D loss rows is what lets the autodiff see that the
    picked entries and the rows match."""
    model = _load(tiny_index, "train_step.onnx")
    producer = {o: n for n in model.graph.node for o in n.output}
    assert not [n for n in model.graph.node if n.op_type == "LogSoftmax"]
    (lse,) = [n for n in model.graph.node if n.op_type == "ReduceLogSumExp"]
    rows = lse.input[0]
    soft = {n.output[0] for n in model.graph.node if n.op_type == "Softmax" and list(n.input) == [rows]}
    fused = [n for n in model.graph.node if n.op_type == "ScatterElements" and n.input[0] in producer
             and producer[n.input[0]].op_type == "Mul" and soft & set(producer[n.input[0]].input)]
    assert len(fused) == 1


def test_tied_embedding_gradient_has_no_zeros_table(tiny_index):
    """wte's gradient is the unembedding's with the embedding's rows scattered in: no
    ConstantOfShape of wte's static shape, which ONNX Runtime would fold into a constant it
    keeps for the session (gpt2: 147 MiB), and no Sum of the two."""
    model = _load(tiny_index, "train_step.onnx")
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    wte = [list(d.dim_value for d in i.type.tensor_type.shape.dim) for i in model.graph.input if i.name == "wte"][0]
    zeros = [n for n in model.graph.node if n.op_type == "ConstantOfShape"
             and n.input[0] in consts and list(consts[n.input[0]]) == wte]
    assert not zeros
    producer = {o: n for n in model.graph.node for o in n.output}
    (update,) = [n for n in model.graph.node if "new.m.wte" in n.output]
    grad = [x for x in producer[update.input[1]].input if x in producer][0]  # g * c1, g the gradient
    assert producer[grad].op_type == "ScatterElements"
    assert producer[producer[grad].input[0]].op_type != "ConstantOfShape"


def test_the_check_sees_each_problem():
    """The inspection above flags every form it is meant to refuse."""
    h = onnx.helper
    nodes = [
        h.make_node("LayerNormalization", ["x", "g"], ["y", "mu", "rs"], axis=-1),
        h.make_node("Size", ["x"], ["n"]),
        h.make_node("Range", ["z", "n", "one"], ["r"]),
        h.make_node("Softmax", ["x"], ["s"], axis=-1),
        h.make_node("Unsqueeze", ["x", "neg"], ["u"]),
        h.make_node("Shape", ["x"], ["sh"], start=-1),
    ]
    g = h.make_graph(nodes, "bad", [], [], [numpy_helper.from_array(np.array([-1], np.int64), "neg")])
    found = " | ".join(_problems(h.make_model(g)))
    for what in ("declares 3 outputs", "op Size", "op Range", "axis=-1", "axes [-1]", "start=-1"):
        assert what in found, (what, found)


def test_training_set_keeps_what_the_gradient_builder_needs(tiny_index):
    """onnxruntime-training's LayerNormalizationGrad reads Mean and InvStdDev, and its
    builder needs the written-out tanh GELU at opset 17."""
    model = _load(tiny_index, "eval_model.onnx")
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {17}
    ops = [n.op_type for n in model.graph.node]
    assert "Gelu" not in ops and "Tanh" in ops
    lns = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert lns and all(len(n.output) == 3 for n in lns)


def test_unpatched_reference_forward_matches_ort(tiny_index):
    ort_rt = runtimes.load(tiny_index, runtime="ort")
    ref = ReferenceEvaluator(str(tiny_index / "forward.onnx"))
    rng = np.random.default_rng(3)
    for t in (64, 17):  # the full context, and a shorter T (the causal mask is sliced to it)
        tokens = rng.integers(0, 256, (2, t), dtype=np.int64)
        positions = np.tile(np.arange(t, dtype=np.int64), (2, 1))
        want = ort_rt.logits(tokens, positions)
        got = ref.run(["logits"], {**ort_rt.parameters(), "tokens": tokens, "positions": positions})[0]
        assert got.shape == (2, t, 256)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_unpatched_reference_train_steps_match_ort(tiny_artifacts):
    """train_step.onnx chained for a few steps on onnx's own evaluator, as shipped (no custom
    ops), against the `ort` runtime."""
    ort_rt = runtimes.load(tiny_artifacts, runtime="ort")
    ref = ReferenceEvaluator(str(tiny_artifacts / "train_step.onnx"))
    names = ort_rt.art.param_names
    params = ort_rt.parameters()
    m = {n: np.zeros_like(a) for n, a in params.items()}
    v = {n: np.zeros_like(a) for n, a in params.items()}
    for t, (tokens, positions, labels) in enumerate(batches(ort_rt.art.config, 3, batch=2, seed=5)):
        hp = runtimes.make_hp(1e-3, 0.9, 0.999, 1e-8, 0.01, step=t + 1)
        want = ort_rt.step(tokens, positions, labels, hp)
        feeds = {**params, **{"m." + n: a for n, a in m.items()}, **{"v." + n: a for n, a in v.items()},
                 "tokens": tokens, "positions": positions, "labels": labels, "hp": hp}
        if "clip" in ref.input_names:  # the gradient-norm threshold; 0 is off, as the runtime's default
            feeds["clip"] = np.array(0.0, np.float32)
        out = dict(zip(ref.output_names, ref.run(None, feeds)))
        assert float(out["loss"]) == pytest.approx(want, rel=1e-5), f"step {t + 1}"
        params = {n: out["new." + n] for n in names}
        m = {n: out["new.m." + n] for n in names}
        v = {n: out["new.v." + n] for n in names}
    for n, a in ort_rt.parameters().items():
        # b_k's exact gradient is zero (softmax ignores a shift shared by every key), so AdamW
        # turns each runtime's rounding noise into steps of up to lr: only that bound holds
        atol = 3 * 1e-3 if n.endswith(".b_k") else 1e-6
        np.testing.assert_allclose(params[n], a, rtol=1e-4, atol=atol, err_msg=n)


# --- the autodiff's own output: the dynamic-shape paths emit no Size/Range and no negative axes

def _rule_cases():
    from tests.test_autodiff_rules import I64, N, rn

    return {
        # LayerNormalization declaring only Y, normalised dims symbolic: mean/rstd recomputed,
        # the element count from Shape + ReduceProd
        "layernorm_y_only_symbolic": dict(
            nodes=[N("LayerNormalization", ["x", "g", "b"], ["y"], axis=1, epsilon=1e-5)],
            diff={"x": rn(2, 3, 4), "g": rn(3, 4), "b": rn(3, 4)}, sym={"x": ["N", "T", "D"]}),
        "layernorm_y_only_negative_axis": dict(
            nodes=[N("LayerNormalization", ["x", "g"], ["y"], axis=-1, epsilon=1e-5)],
            diff={"x": rn(2, 3, 5), "g": rn(5)}),
        "reduce_mean_symbolic_all": dict(nodes=[N("ReduceMean", ["a"], ["y"], keepdims=0)],
                                         diff={"a": rn(2, 3, 4)}, sym={"a": ["N", 3, "D"]}),
        "reduce_mean_negative_axes": dict(nodes=[N("ReduceMean", ["a", "ax"], ["y"], keepdims=0)],
                                          diff={"a": rn(2, 3, 4)}, sym={"a": ["N", "T", 4]},
                                          inits={"ax": np.array([-1, -2], I64)}, opset=18),
        "softmax_negative_axis": dict(nodes=[N("Softmax", ["a"], ["y"], axis=-1)], diff={"a": rn(2, 5)}),
        "gather_elements_negative_axis": dict(
            nodes=[N("LogSoftmax", ["a"], ["l"], axis=-1), N("GatherElements", ["l", "i"], ["y"], axis=-1)],
            diff={"a": rn(2, 3, 5)}, consts={"i": np.array([[[0], [4], [2]], [[1], [1], [3]]], I64)}),
    }


@pytest.mark.parametrize("name", ["layernorm_y_only_symbolic", "layernorm_y_only_negative_axis",
                                  "reduce_mean_symbolic_all", "reduce_mean_negative_axes",
                                  "softmax_negative_axis", "gather_elements_negative_axis"])
def test_backward_is_portable_and_exact(name):
    """Finite differences, and the backward nodes (all but the forward's) in portable forms
    even where the forward is not (negative axes)."""
    from tests.test_autodiff_rules import check_vjp

    case = _rule_cases()[name]
    bwd = check_vjp(**case)
    back = onnx.ModelProto()
    back.CopyFrom(bwd)
    del back.graph.node[:len(case["nodes"])]
    assert _problems(back) == []
