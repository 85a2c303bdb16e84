"""graphgen/in_place.py: when a step graph lets new parameters overwrite the old ones."""

from __future__ import annotations

import json

import onnx
import pytest
from onnx import TensorProto, helper

from contract import new_name
from graphgen.in_place import parameters_updatable_in_place


def _graph(nodes, outputs=("y", "new.w")) -> onnx.ModelProto:
    f = TensorProto.FLOAT
    g = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("w", f, [2, 2]), helper.make_tensor_value_info("x", f, [2, 2])],
        [helper.make_tensor_value_info(o, f, None) for o in outputs],
        [helper.make_tensor(n, f, [], [v]) for n, v in (("c", 0.5), ("d", 0.9))],
    )
    return helper.make_model(g)


# (case, nodes, safe): w is read by the forward MatMul; new.w = w*d - something
CASES = [
    ("update depends on the reader", [
        helper.make_node("MatMul", ["x", "w"], ["y"]),
        helper.make_node("ReduceSum", ["y"], ["s"], keepdims=0),
        helper.make_node("Mul", ["w", "d"], ["wd"]),
        helper.make_node("Mul", ["s", "c"], ["u"]),
        helper.make_node("Sub", ["wd", "u"], ["new.w"]),
    ], True),
    ("update independent of the reader", [
        helper.make_node("MatMul", ["x", "w"], ["y"]),
        helper.make_node("Mul", ["w", "d"], ["wd"]),
        helper.make_node("Sub", ["wd", "c"], ["new.w"]),
    ], False),
    ("reader of a view, not of w itself", [
        helper.make_node("Reshape", ["w", "shape"], ["wr"]),
        helper.make_node("MatMul", ["x", "wr"], ["y"]),
        helper.make_node("Mul", ["w", "d"], ["wd"]),
        helper.make_node("Sub", ["wd", "c"], ["new.w"]),
    ], False),
    ("reader of a view, ancestor of the update", [
        helper.make_node("Reshape", ["w", "shape"], ["wr"]),
        helper.make_node("MatMul", ["x", "wr"], ["y"]),
        helper.make_node("ReduceSum", ["y"], ["s"], keepdims=0),
        helper.make_node("Mul", ["w", "d"], ["wd"]),
        helper.make_node("Sub", ["wd", "s"], ["new.w"]),
    ], True),
    ("a copy (Transpose) the update does not wait for", [
        helper.make_node("Transpose", ["w"], ["wt"]),
        helper.make_node("Mul", ["w", "d"], ["wd"]),
        helper.make_node("Sub", ["wd", "c"], ["new.w"]),
        helper.make_node("MatMul", ["x", "wt"], ["y"]),
    ], False),
    ("a copy's readers need not wait: only the copy reads w", [
        helper.make_node("Transpose", ["w"], ["wt"]),
        helper.make_node("ReduceSum", ["wt"], ["s"], keepdims=0),
        helper.make_node("Mul", ["w", "d"], ["wd"]),
        helper.make_node("Sub", ["wd", "s"], ["new.w"]),
        helper.make_node("MatMul", ["x", "wt"], ["y"]),
    ], True),
]


@pytest.mark.parametrize("case, nodes, safe", CASES, ids=[c[0] for c in CASES])
def test_in_place_rule(case, nodes, safe):
    model = _graph(nodes)
    model.graph.initializer.append(helper.make_tensor("shape", TensorProto.INT64, [2], [2, 2]))
    assert parameters_updatable_in_place(model, ["w"], new_name) is safe


def test_a_parameter_without_an_update_is_not_in_place():
    model = _graph([helper.make_node("MatMul", ["x", "w"], ["y"])], outputs=("y",))
    assert parameters_updatable_in_place(model, ["w"], new_name) is False


def test_built_step_graphs_allow_in_place_and_the_manifest_says_so(tiny_index):
    m = json.loads((tiny_index / "manifest.json").read_text())
    params = [p["name"] for p in m["parameters"]]
    for f in ("train_step.onnx", "apply_step.onnx"):
        assert parameters_updatable_in_place(onnx.load(str(tiny_index / f)), params, new_name), f
    assert m["train_step"]["in_place"] is True
    # the forward graph updates nothing
    assert not parameters_updatable_in_place(onnx.load(str(tiny_index / "forward.onnx")), params, new_name)
