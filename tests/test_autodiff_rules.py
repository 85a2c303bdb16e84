"""Finite-difference checks of every VJP rule in graphgen.vjp_rules.

Each case is a tiny float64 graph (one or a few nodes). The backward pass is built
with ``add_vjp`` for a random cotangent ``c`` on every output; the result must equal
the central finite difference of ``sum(c * f(x))`` for every element of every
differentiable input. Graphs run in ``onnx.reference.ReferenceEvaluator``.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh
from onnx.reference import ReferenceEvaluator

from tests.reference_ops import GatherElements  # the test graphs use axis=-1
from graphgen.autodiff import AutodiffError, Rule, UnsupportedOpError, add_gradients, add_vjp, like_output
from graphgen.vjp_rules import RULES

OPSET = 17


def evaluator(model):
    return ReferenceEvaluator(model, new_ops=[GatherElements])


def np_to_tp(a: np.ndarray) -> int:
    return h.np_dtype_to_tensor_dtype(a.dtype)


def build(nodes, diff, consts=None, inits=None, outputs=("y",), sym=None, opset=OPSET):
    consts = consts or {}
    inits = inits or {}
    sym = sym or {}
    inputs = [h.make_tensor_value_info(n, np_to_tp(a), sym.get(n, list(a.shape))) for n, a in diff.items()]
    inputs += [h.make_tensor_value_info(n, np_to_tp(a), sym.get(n, list(a.shape))) for n, a in consts.items()]
    outs = [h.make_tensor_value_info(o, TP.UNDEFINED, None) for o in outputs]
    g = h.make_graph(nodes, "case", inputs, outs, [nh.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 10
    return m


def check_vjp(nodes, diff, consts=None, inits=None, outputs=("y",), sym=None, eps=1e-6, rtol=1e-6,
              atol=1e-8, seed=0, opset=OPSET):
    rng = np.random.default_rng(seed)
    consts = consts or {}
    fwd = build(nodes, diff, consts, inits, outputs, sym, opset)
    run_f = evaluator(fwd)
    feeds = {**diff, **consts}
    ys = run_f.run(None, feeds)
    cts = {f"ct.{o}": rng.standard_normal(y.shape).astype(y.dtype) for o, y in zip(outputs, ys)}

    bwd = copy.deepcopy(fwd)
    for o, y in zip(outputs, ys):
        bwd.graph.input.append(h.make_tensor_value_info(f"ct.{o}", np_to_tp(y), list(y.shape)))
    grads = add_vjp(bwd, list(outputs), list(cts), list(diff))
    del bwd.graph.output[:]
    for n, gname in grads.items():
        bwd.graph.node.append(h.make_node("Identity", [gname], [f"grad.{n}"]))
        bwd.graph.output.append(h.make_tensor_value_info(f"grad.{n}", np_to_tp(diff[n]), list(diff[n].shape)))
    onnx.checker.check_model(bwd, full_check=True)
    onnx.shape_inference.infer_shapes(bwd, check_type=True, strict_mode=True)
    got = dict(zip([o.name for o in bwd.graph.output], evaluator(bwd).run(None, {**feeds, **cts})))

    def f(fd):
        return sum(float(np.sum(ct.astype(np.float64) * y.astype(np.float64)))
                   for ct, y in zip(cts.values(), run_f.run(None, fd)))

    for n, x in diff.items():
        fd_grad = np.zeros(x.shape)
        for j in range(x.size):
            xp = x.copy()
            xp.flat[j] += eps
            fp = f({**feeds, n: xp})
            xp.flat[j] -= 2 * eps
            fm = f({**feeds, n: xp})
            fd_grad.flat[j] = (fp - fm) / (2 * eps)
        g = got[f"grad.{n}"]
        assert g.shape == x.shape, (n, g.shape, x.shape)
        np.testing.assert_allclose(g, fd_grad, rtol=rtol, atol=atol, err_msg=f"gradient of {n}")
    return bwd


R = np.random.default_rng(1234)


def rn(*shape):
    return R.standard_normal(shape)


def pos(*shape):
    return R.uniform(0.5, 2.0, shape)


N = h.make_node
I64 = np.int64

# name -> kwargs for check_vjp
CASES = {
    "add_bcast_trailing": dict(nodes=[N("Add", ["a", "b"], ["y"])], diff={"a": rn(2, 3, 4), "b": rn(4)}),
    "add_bcast_both": dict(nodes=[N("Add", ["a", "b"], ["y"])], diff={"a": rn(2, 1, 4), "b": rn(3, 1)}),
    "add_bcast_symbolic": dict(nodes=[N("Add", ["a", "b"], ["y"])], diff={"a": rn(2, 3, 4), "b": rn(1, 4)},
                               sym={"a": ["N", "T", 4], "b": ["U", 4]}),
    "add_same_symbolic": dict(nodes=[N("Add", ["a", "b"], ["y"])], diff={"a": rn(2, 3), "b": rn(2, 3)},
                              sym={"a": ["N", "T"], "b": ["N", "T"]}),
    "sub_bcast": dict(nodes=[N("Sub", ["a", "b"], ["y"])], diff={"a": rn(3, 4), "b": rn(2, 1, 4)}),
    "mul_bcast": dict(nodes=[N("Mul", ["a", "b"], ["y"])], diff={"a": rn(2, 3, 4), "b": rn(1, 3, 1)}),
    "mul_scalar_const": dict(nodes=[N("Mul", ["a", "k"], ["y"])], diff={"a": rn(2, 3)},
                             inits={"k": np.array(0.7)}),
    "div_bcast": dict(nodes=[N("Div", ["a", "b"], ["y"])], diff={"a": rn(2, 3), "b": pos(3)}),
    "neg": dict(nodes=[N("Neg", ["a"], ["y"])], diff={"a": rn(2, 3)}),
    "sum_variadic": dict(nodes=[N("Sum", ["a", "b", "c"], ["y"])], diff={"a": rn(2, 3), "b": rn(3), "c": rn(2, 1)}),
    "pow_3": dict(nodes=[N("Pow", ["a", "p"], ["y"])], diff={"a": rn(2, 3)}, inits={"p": np.array(3.0)}),
    "pow_2_f32_exponent": dict(nodes=[N("Pow", ["a", "p"], ["y"])], diff={"a": rn(2, 3)},
                               inits={"p": np.array(2.0, np.float32)}),
    "pow_half_constant_node": dict(
        nodes=[N("Constant", [], ["p"], value=nh.from_array(np.array(0.5))), N("Pow", ["a", "p"], ["y"])],
        diff={"a": pos(2, 3)}),
    "pow_runtime_exponent": dict(nodes=[N("Pow", ["a", "p"], ["y"])], diff={"a": pos(2, 3)},
                                 consts={"p": np.array([1.5, 2.5, 3.0])}),
    "tanh": dict(nodes=[N("Tanh", ["a"], ["y"])], diff={"a": rn(2, 3)}),
    "sigmoid": dict(nodes=[N("Sigmoid", ["a"], ["y"])], diff={"a": rn(2, 3)}),
    "exp": dict(nodes=[N("Exp", ["a"], ["y"])], diff={"a": rn(2, 3)}),
    "log": dict(nodes=[N("Log", ["a"], ["y"])], diff={"a": pos(2, 3)}),
    "sqrt": dict(nodes=[N("Sqrt", ["a"], ["y"])], diff={"a": pos(2, 3)}),
    "reciprocal": dict(nodes=[N("Reciprocal", ["a"], ["y"])], diff={"a": pos(2, 3)}),
    # the reference Erf computes in float32
    "erf": dict(nodes=[N("Erf", ["a"], ["y"])], diff={"a": rn(2, 3)}, eps=1e-3, rtol=1e-3, atol=3e-4),
    "gelu_tanh": dict(nodes=[N("Gelu", ["a"], ["y"], approximate="tanh")],
                      diff={"a": np.concatenate([rn(2, 3), [[-9.0, -4.0, -0.5], [0.5, 4.0, 9.0]]])}, opset=20),
    # the reference Erf computes in float32
    "gelu_exact": dict(nodes=[N("Gelu", ["a"], ["y"])], diff={"a": rn(2, 3)}, opset=20,
                       eps=1e-3, rtol=1e-3, atol=3e-4),
    "relu": dict(nodes=[N("Relu", ["a"], ["y"])], diff={"a": np.array([[-1.0, 0.5, 2.0], [0.3, -0.2, -3.0]])}),
    "matmul_2d": dict(nodes=[N("MatMul", ["a", "b"], ["y"])], diff={"a": rn(3, 4), "b": rn(4, 2)}),
    "matmul_3d_2d": dict(nodes=[N("MatMul", ["a", "b"], ["y"])], diff={"a": rn(2, 3, 4), "b": rn(4, 5)}),
    "matmul_3d_2d_symbolic": dict(nodes=[N("MatMul", ["a", "b"], ["y"])], diff={"a": rn(2, 3, 4), "b": rn(4, 5)},
                                  sym={"a": ["B", "T", "K"]}),
    "matmul_4d_4d": dict(nodes=[N("MatMul", ["a", "b"], ["y"])], diff={"a": rn(2, 2, 3, 4), "b": rn(2, 2, 4, 3)}),
    "matmul_batch_bcast": dict(nodes=[N("MatMul", ["a", "b"], ["y"])], diff={"a": rn(2, 1, 3, 4), "b": rn(3, 4, 2)}),
    "matmul_2d_3d": dict(nodes=[N("MatMul", ["a", "b"], ["y"])], diff={"a": rn(3, 4), "b": rn(2, 4, 2)}),
    "transpose_perm": dict(nodes=[N("Transpose", ["a"], ["y"], perm=[2, 0, 1])], diff={"a": rn(2, 3, 4)}),
    "transpose_default": dict(nodes=[N("Transpose", ["a"], ["y"])], diff={"a": rn(2, 3, 4)}),
    "reshape_copy_dim": dict(nodes=[N("Reshape", ["a", "s"], ["y"])], diff={"a": rn(2, 3, 4)},
                             inits={"s": np.array([0, -1, 2], I64)}),
    "unsqueeze": dict(nodes=[N("Unsqueeze", ["a", "ax"], ["y"])], diff={"a": rn(2, 3)},
                      inits={"ax": np.array([0, -1], I64)}),
    "squeeze": dict(nodes=[N("Squeeze", ["a", "ax"], ["y"])], diff={"a": rn(2, 1, 3)},
                    inits={"ax": np.array([1], I64)}),
    "flatten": dict(nodes=[N("Flatten", ["a"], ["y"], axis=2)], diff={"a": rn(2, 3, 2)}),
    "identity": dict(nodes=[N("Identity", ["a"], ["y"])], diff={"a": rn(2, 3)}),
    "cast_f64_f32_f64": dict(nodes=[N("Cast", ["a"], ["a32"], to=TP.FLOAT), N("Tanh", ["a32"], ["t"]),
                                    N("Cast", ["t"], ["y"], to=TP.DOUBLE)],
                             diff={"a": rn(2, 3)}, eps=1e-3, rtol=1e-3, atol=1e-5),
    "expand": dict(nodes=[N("Expand", ["a", "s"], ["y"])], diff={"a": rn(3, 1)},
                   inits={"s": np.array([2, 3, 4], I64)}),
    "concat_with_const_input": dict(nodes=[N("Concat", ["a", "k", "b"], ["y"], axis=1)],
                                    diff={"a": rn(2, 1, 3), "b": rn(2, 2, 3)}, consts={"k": rn(2, 3, 3)}),
    "concat_symbolic": dict(nodes=[N("Concat", ["a", "b"], ["y"], axis=-1)], diff={"a": rn(2, 3), "b": rn(2, 2)},
                            sym={"a": ["N", "P"], "b": ["N", "Q"]}),
    "split_partial_use": dict(nodes=[N("Split", ["a", "s"], ["y0", "y1", "y2"], axis=1)], diff={"a": rn(2, 6)},
                              inits={"s": np.array([1, 2, 3], I64)}, outputs=("y0", "y2")),
    "split_equal": dict(nodes=[N("Split", ["a"], ["y0", "y1"], axis=-1)], diff={"a": rn(3, 4)},
                        outputs=("y0", "y1")),
    "slice_pad_path": dict(nodes=[N("Slice", ["a", "st", "en", "ax"], ["y"])], diff={"a": rn(3, 5)},
                           inits={"st": np.array([1, -4], I64), "en": np.array([100, -1], I64),
                                  "ax": np.array([0, 1], I64)}),
    "slice_steps": dict(nodes=[N("Slice", ["a", "st", "en", "ax", "sp"], ["y"])], diff={"a": rn(4, 5)},
                        inits={"st": np.array([-1, 0], I64), "en": np.array([-100, 5], I64),
                               "ax": np.array([0, 1], I64), "sp": np.array([-2, 2], I64)}),
    "slice_runtime_bounds": dict(nodes=[N("Slice", ["a", "st", "en"], ["y"])], diff={"a": rn(4, 3)},
                                 consts={"st": np.array([1, 0], I64), "en": np.array([3, 2], I64)}),
    "layernorm_last_axis": dict(
        nodes=[N("LayerNormalization", ["x", "g", "b"], ["y", "mu", "rs"], axis=-1, epsilon=1e-5)],
        diff={"x": rn(2, 3, 5), "g": rn(5), "b": rn(5)}),
    "layernorm_axis1_no_bias": dict(nodes=[N("LayerNormalization", ["x", "g"], ["y"], axis=1, epsilon=1e-3)],
                                    diff={"x": rn(2, 3, 4), "g": rn(3, 4)}),
    "softmax_last": dict(nodes=[N("Softmax", ["a"], ["y"], axis=-1)], diff={"a": rn(2, 3, 4)}),
    "softmax_axis1": dict(nodes=[N("Softmax", ["a"], ["y"], axis=1)], diff={"a": rn(2, 3, 4)}),
    "logsoftmax": dict(nodes=[N("LogSoftmax", ["a"], ["y"], axis=-1)], diff={"a": rn(2, 3, 5)}),
    "gather_elements_last_repeated": dict(
        nodes=[N("GatherElements", ["a", "i"], ["y"], axis=-1)], diff={"a": rn(2, 3, 5)},
        consts={"i": np.array([[[0, 0, 4, -1]] * 3] * 2, I64)}),
    # the fused cross-entropy backward (LogSoftmax's rule sees GatherElements' scatter into zeros)
    "logsoftmax_gather_elements": dict(
        nodes=[N("LogSoftmax", ["a"], ["l"], axis=-1), N("GatherElements", ["l", "i"], ["y"], axis=-1)],
        diff={"a": rn(2, 3, 5)}, consts={"i": np.array([[[0, 0, 4, -1]] * 3] * 2, I64)}),
    "logsoftmax_gather_elements_other_axis": dict(
        nodes=[N("LogSoftmax", ["a"], ["l"], axis=-1), N("GatherElements", ["l", "i"], ["y"], axis=1)],
        diff={"a": rn(2, 3, 5)}, consts={"i": np.array([[[0, 2, 1, 1, 0]]] * 2, I64)}),
    "logsoftmax_gather_elements_symbolic": dict(
        nodes=[N("LogSoftmax", ["a"], ["l"], axis=2), N("GatherElements", ["l", "i"], ["y"], axis=-1)],
        diff={"a": rn(2, 3, 5)}, consts={"i": np.array([[[4], [1], [0]]] * 2, I64)},
        sym={"a": ["B", "T", 5], "i": ["B", "T", 1]}),
    "reduce_log_sum_exp_keep1": dict(nodes=[N("ReduceLogSumExp", ["a", "ax"], ["y"], keepdims=1)],
                                     diff={"a": rn(2, 3, 4)}, inits={"ax": np.array([1], I64)}, opset=20),
    "reduce_log_sum_exp_keep0": dict(nodes=[N("ReduceLogSumExp", ["a", "ax"], ["y"], keepdims=0)],
                                     diff={"a": rn(2, 3, 4)}, inits={"ax": np.array([-1, 0], I64)}, opset=20),
    "reduce_log_sum_exp_all": dict(nodes=[N("ReduceLogSumExp", ["a"], ["y"], keepdims=0)], diff={"a": rn(2, 3)}),
    "reduce_log_sum_exp_opset17": dict(nodes=[N("ReduceLogSumExp", ["a"], ["y"], axes=[1], keepdims=1)],
                                       diff={"a": rn(3, 5)}, opset=17),
    # the cross-entropy as the loss spells it: logsumexp(x) - x[label], rows of 2-D logits
    "cross_entropy_lse": dict(
        nodes=[N("ReduceLogSumExp", ["a", "ax"], ["lse"], keepdims=1), N("GatherElements", ["a", "i"], ["p"], axis=1),
               N("Sub", ["lse", "p"], ["y"])],
        diff={"a": rn(4, 5)}, inits={"ax": np.array([1], I64)}, consts={"i": np.array([[0], [4], [4], [2]], I64)},
        opset=20),
    # a tied table: gathered rows and a dense use (the embedding and the unembedding)
    "gather_tied_dense": dict(
        nodes=[N("Gather", ["w", "i"], ["e"], axis=0), N("Transpose", ["w"], ["wt"], perm=[1, 0]),
               N("MatMul", ["e", "wt"], ["y"])],
        diff={"w": rn(5, 3)}, consts={"i": np.array([[0, 3, 3], [4, 0, 3]], I64)}),
    "gather_elements_axis0": dict(nodes=[N("GatherElements", ["a", "i"], ["y"], axis=0)], diff={"a": rn(3, 2)},
                                  consts={"i": np.array([[2, 0], [2, 2]], I64)}),
    "gather_rows_repeated": dict(nodes=[N("Gather", ["w", "i"], ["y"], axis=0)], diff={"w": rn(5, 4)},
                                 consts={"i": np.array([[0, 3, 3], [4, 0, 3]], I64)}),
    "gather_negative_indices": dict(nodes=[N("Gather", ["w", "i"], ["y"])], diff={"w": rn(5, 2)},
                                    consts={"i": np.array([-1, 4, 0, -5], I64)}),
    "gather_const_indices_int32": dict(nodes=[N("Gather", ["w", "i"], ["y"])], diff={"w": rn(4, 3)},
                                       inits={"i": np.array([1, 1, 3], np.int32)}),
    "gather_axis1": dict(nodes=[N("Gather", ["w", "i"], ["y"], axis=1)], diff={"w": rn(2, 4, 3)},
                         consts={"i": np.array([[3, 0], [3, 3]], I64)}),
    "gather_symbolic_table": dict(nodes=[N("Gather", ["w", "i"], ["y"])], diff={"w": rn(4, 3)},
                                  consts={"i": np.array([-1, 2, 2], I64)}, sym={"w": ["V", 3]}),
    "reduce_mean_keep0": dict(nodes=[N("ReduceMean", ["a"], ["y"], axes=[1], keepdims=0)], diff={"a": rn(2, 3, 4)}),
    "reduce_mean_all": dict(nodes=[N("ReduceMean", ["a"], ["y"], keepdims=0)], diff={"a": rn(2, 3)}),
    "reduce_mean_symbolic": dict(nodes=[N("ReduceMean", ["a"], ["y"], axes=[-1, 0], keepdims=1)],
                                 diff={"a": rn(2, 3, 4)}, sym={"a": ["B", 3, "K"]}),
    "reduce_sum_keep0": dict(nodes=[N("ReduceSum", ["a", "ax"], ["y"], keepdims=0)], diff={"a": rn(2, 3, 4)},
                             inits={"ax": np.array([-1, 0], I64)}),
    "reduce_sum_keep1": dict(nodes=[N("ReduceSum", ["a", "ax"], ["y"], keepdims=1)], diff={"a": rn(2, 3)},
                             inits={"ax": np.array([1], I64)}),
    "reduce_sum_all": dict(nodes=[N("ReduceSum", ["a"], ["y"], keepdims=0)], diff={"a": rn(2, 3)}),
    "reduce_sum_noop": dict(nodes=[N("ReduceSum", ["a"], ["y"], keepdims=0, noop_with_empty_axes=1)],
                            diff={"a": rn(2, 3)}),
    "where_bcast": dict(nodes=[N("Where", ["c", "a", "b"], ["y"])], diff={"a": rn(2, 3, 4), "b": rn(4)},
                        consts={"c": R.random((3, 4)) > 0.5}),
    "where_mask_scalar_fill": dict(nodes=[N("Where", ["c", "a", "k"], ["y"])], diff={"a": rn(2, 3, 3)},
                                   consts={"c": np.tril(np.ones((3, 3), bool))}, inits={"k": np.array(-3.0)}),
    # x used by several nodes: contributions are summed
    "value_used_twice": dict(nodes=[N("Mul", ["a", "a"], ["sq"]), N("Mul", ["a", "w"], ["aw"]),
                                    N("Add", ["sq", "aw"], ["s"]), N("Add", ["s", "a"], ["y"])],
                             diff={"a": rn(2, 3), "w": rn(3)}),
    # a linear layer x @ W^T, W (out, in): both operand orders of the weight gradient's transpose
    "linear_wide_out": dict(nodes=[N("Transpose", ["w"], ["wT"], perm=[1, 0]), N("MatMul", ["x", "wT"], ["y"])],
                            diff={"x": rn(2, 3, 4), "w": rn(6, 4)}),
    "linear_narrow_out_symbolic": dict(
        nodes=[N("Transpose", ["w"], ["wT"], perm=[1, 0]), N("MatMul", ["x", "wT"], ["y"])],
        diff={"x": rn(3, 5, 4), "w": rn(2, 4)}, sym={"x": ["B", "T", 4]}),
    "tied_embedding": dict(nodes=[N("Gather", ["w", "i"], ["e"]), N("Transpose", ["w"], ["wT"], perm=[1, 0]),
                                  N("MatMul", ["e", "wT"], ["y"])],
                           diff={"w": rn(5, 3)}, consts={"i": np.array([[1, 1, 4]], I64)}),
    "integer_subgraph_not_differentiated": dict(
        nodes=[N("Shape", ["a"], ["sa"]), N("Cast", ["sa"], ["saf"], to=TP.DOUBLE), N("ReduceSum", ["saf"], ["n"]),
               N("Reshape", ["a", "sa"], ["ar"]), N("Mul", ["ar", "n"], ["y"])],
        diff={"a": rn(2, 3)}),
    "two_outputs": dict(nodes=[N("Tanh", ["a"], ["y0"]), N("Mul", ["y0", "a"], ["y1"])], diff={"a": rn(3)},
                        outputs=("y0", "y1")),
    "unused_param_gets_zeros": dict(nodes=[N("Tanh", ["a"], ["y"])], diff={"a": rn(3), "u": rn(2, 2)}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_matches_finite_differences(name):
    kw = dict(CASES[name])
    kw["diff"] = {k: np.asarray(v, np.float64).copy() for k, v in kw["diff"].items()}
    check_vjp(**kw)


def test_required_rules_present():
    required = ["Gather", "Add", "Sub", "Mul", "Div", "Neg", "Pow", "Tanh", "MatMul", "Transpose", "Reshape",
                "Concat", "Split", "Slice", "Unsqueeze", "Squeeze", "Identity", "Cast", "Expand",
                "LayerNormalization", "Softmax", "LogSoftmax", "GatherElements", "ReduceMean", "ReduceSum", "Where"]
    assert not [op for op in required if op not in RULES]


def test_every_rule_is_exercised():
    used = {n.op_type for case in CASES.values() for n in case["nodes"]}
    assert not set(RULES) - used, f"rules without a finite-difference case: {sorted(set(RULES) - used)}"


def test_dynamic_reduction_path_used_for_ambiguous_symbolic_broadcast():
    bwd = check_vjp(**CASES["add_bcast_symbolic"])
    assert any(n.op_type == "Compress" for n in bwd.graph.node)
    bwd = check_vjp(**CASES["add_same_symbolic"])
    assert not any(n.op_type in ("Compress", "ReduceSum") for n in bwd.graph.node)


def test_gather_gradient_uses_scatter_elements_add():
    bwd = check_vjp(**CASES["gather_rows_repeated"])
    assert not [n for n in bwd.graph.node if n.op_type == "ScatterND"]
    sc = [n for n in bwd.graph.node if n.op_type == "ScatterElements"]
    assert sc and all(h.get_attribute_value(a) == b"add" for n in sc for a in n.attribute if a.name == "reduction")


def test_embedding_gradient_is_exact_on_multithreaded_onnxruntime():
    """The Gather rule's backward on onnxruntime with 2 threads, at a size where its kernels
    split work across threads, against NumPy's serial np.add.at. Every token repeats ~32 times.
    (onnxruntime's ScatterND with reduction="add", which this rule once used, fails this:
    its threads race on repeated rows and lose additions, errors of order 1.)"""
    from runtimes.ort_env import import_onnxruntime

    ort = import_onnxruntime()
    v, d, n = 256, 768, 8192
    rng = np.random.default_rng(0)
    w = rng.standard_normal((v, d)).astype(np.float32)
    ids = rng.integers(0, v, (2, n // 2))
    ct = rng.standard_normal((2, n // 2, d)).astype(np.float32)
    m = build([N("Gather", ["w", "i"], ["y"], axis=0)], {"w": w}, consts={"i": ids})
    m.graph.input.append(h.make_tensor_value_info("ct.y", TP.FLOAT, list(ct.shape)))
    grads = add_vjp(m, ["y"], ["ct.y"], ["w"])
    del m.graph.output[:]
    m.graph.output.append(h.make_tensor_value_info(grads["w"], TP.FLOAT, [v, d]))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    want = np.zeros((v, d))
    np.add.at(want, ids.reshape(-1), ct.reshape(-1, d).astype(np.float64))
    for _ in range(3):
        got = sess.run(None, {"w": w, "i": ids, "ct.y": ct})[0]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name, fused", [("logsoftmax_gather_elements", True),
                                         ("logsoftmax_gather_elements_symbolic", True),
                                         ("logsoftmax_gather_elements_other_axis", False)])
def test_cross_entropy_backward_is_one_scatter_without_zeros(name, fused):
    """LogSoftmax's rule folds the picked entries' scatter_add into its own output when the
    scatter runs along the softmax axis (no zeros tensor, no dense Sub); otherwise it falls back."""
    ops = [n.op_type for n in check_vjp(**CASES[name]).graph.node]
    assert (ops.count("ConstantOfShape"), ops.count("ScatterElements"), "Sub" in ops) == (
        (0, 1, False) if fused else (1, 1, True))


@pytest.mark.parametrize("name", ["cross_entropy_lse", "gather_tied_dense"])
def test_gathered_contribution_is_scattered_into_the_dense_one(name):
    """A value used by a Gather(Elements) and by dense ops gets one cotangent: the gathered
    entries scattered into the dense contribution, with no zeros tensor and no Sum (an engine
    folds a zeros tensor of a weight's static shape into a constant it keeps)."""
    ops = [n.op_type for n in check_vjp(**CASES[name]).graph.node]
    assert (ops.count("ConstantOfShape"), ops.count("ScatterElements"), ops.count("Sum")) == (0, 1, 0)


def test_layernorm_float32_uses_saved_statistics_and_matches_float64():
    x, g, b = rn(2, 3, 6), rn(6), rn(6)
    ln = [N("LayerNormalization", ["x", "g", "b"], ["y", "mu", "rs"], axis=-1, epsilon=1e-5)]
    ct = rn(2, 3, 6)
    results = []
    for dt in (np.float64, np.float32):
        diff = {"x": x.astype(dt), "g": g.astype(dt), "b": b.astype(dt)}
        m = build(ln, diff)
        m.graph.input.append(h.make_tensor_value_info("ct", np_to_tp(diff["x"]), [2, 3, 6]))
        grads = add_vjp(m, ["y"], ["ct"], ["x", "g", "b"])
        del m.graph.output[:]
        for k, v in grads.items():
            m.graph.output.append(h.make_tensor_value_info(v, np_to_tp(diff[k]), None))
        uses_saved = any("rs" in n.input for n in m.graph.node[1:])
        assert uses_saved == (dt == np.float32)
        results.append(evaluator(m).run(None, {**diff, "ct": ct.astype(dt)}))
    for a, b_ in zip(*results):
        np.testing.assert_allclose(b_, a, rtol=1e-4, atol=1e-5)


def test_add_gradients_scalar_loss_and_names():
    m = build([N("Mul", ["a", "a"], ["sq"]), N("ReduceSum", ["sq"], ["loss"], keepdims=0)], {"a": rn(4)},
              outputs=("loss",))
    grads = add_gradients(m, "loss", ["a"], grad_names={"a": "grad.a"})
    assert grads == {"a": "grad.a"}
    m.graph.output.append(h.make_tensor_value_info("grad.a", TP.DOUBLE, [4]))
    a = np.arange(4.0)
    loss, ga = evaluator(m).run(None, {"a": a})
    np.testing.assert_allclose(ga, 2 * a)


def test_unsupported_op_on_path_raises_with_op_and_node_name():
    m = build([N("Cos", ["a"], ["c"], name="my_cos"), N("ReduceSum", ["c"], ["loss"], keepdims=0)],
              {"a": rn(3)}, outputs=("loss",))
    with pytest.raises(UnsupportedOpError, match=r"Cos.*my_cos"):
        add_gradients(m, "loss", ["a"])
    assert issubclass(UnsupportedOpError, ValueError)


def test_unsupported_op_off_path_is_ignored():
    # Cos only touches a non-parameter input: no rule needed
    m = build([N("Cos", ["k"], ["c"], name="const_cos"), N("Mul", ["a", "c"], ["p"]),
               N("ReduceSum", ["p"], ["loss"], keepdims=0)], {"a": rn(3)}, consts={"k": rn(3)}, outputs=("loss",))
    add_gradients(m, "loss", ["a"])


def test_non_constant_pow_exponent_on_path_raises():
    m = build([N("Pow", ["a", "e"], ["p"], name="pw"), N("ReduceSum", ["p"], ["loss"], keepdims=0)],
              {"a": pos(3), "e": rn(3)}, outputs=("loss",))
    with pytest.raises(UnsupportedOpError, match="Pow.*pw"):
        add_gradients(m, "loss", ["a", "e"])


def _with_cotangent(m, name="y", shape=(2, 3, 4)):
    m.graph.input.append(h.make_tensor_value_info(f"ct.{name}", TP.DOUBLE, list(shape)))
    return m


@pytest.mark.parametrize("generator", [False, True])
def test_rule_returning_more_results_than_inputs_raises(monkeypatch, generator):
    def extra(ctx, node, gouts):
        return [gouts[0], None]

    def extra_gen(ctx, node, gouts):
        yield gouts[0]
        yield None

    monkeypatch.setitem(RULES, "Neg", Rule(extra_gen if generator else extra))
    m = _with_cotangent(build([N("Neg", ["a"], ["y"], name="my_neg")], {"a": rn(2, 3, 4)}))
    with pytest.raises(AutodiffError, match=r"Neg rule returned 2 results for node 'my_neg', which has 1 inputs"):
        add_vjp(m, ["y"], ["ct.y"], ["a"])


def test_rule_may_return_fewer_results_than_inputs():
    # Reshape's rule gives only the data input's cotangent; the shape input gets none
    m = build([N("Reshape", ["a", "s"], ["y"])], {"a": rn(2, 3, 4)}, inits={"s": np.array([6, 4], I64)})
    m.graph.input.append(h.make_tensor_value_info("ct.y", TP.DOUBLE, [6, 4]))
    node = m.graph.node[0]
    grads = add_vjp(m, ["y"], ["ct.y"], ["a"])
    assert [n.op_type for n in m.graph.node if n is not node] == ["Reshape"] and "a" in grads


def test_engine_sums_cotangents_of_broadcast_inputs(monkeypatch):
    """The Add rule returns g for both inputs; summing it to each input's shape is the engine's
    work, driven by the rule's grad_like (no node at all where the shapes are equal)."""
    def fwd():
        return _with_cotangent(build([N("Add", ["a", "b"], ["y"])], {"a": rn(2, 3, 4), "b": rn(4)}))

    assert RULES["Add"].grad_like is like_output
    m = fwd()
    grads = add_vjp(m, ["y"], ["ct.y"], ["a", "b"])
    assert grads["a"] == "ct.y"
    red = [n for n in m.graph.node if n.op_type == "ReduceSum"]
    assert len(red) == 1 and red[0].input[0] == "ct.y" and grads["b"] == red[0].output[0]

    monkeypatch.setitem(RULES, "Add", Rule(RULES["Add"].fn))  # same math, no grad_like
    m = fwd()
    assert add_vjp(m, ["y"], ["ct.y"], ["a", "b"]) == {"a": "ct.y", "b": "ct.y"}
    assert not any(n.op_type == "ReduceSum" for n in m.graph.node)


@pytest.mark.parametrize("name", ["sub_bcast", "div_bcast"])
def test_negated_cotangent_is_negated_after_the_sum(name):
    # gB = -unbroadcast(...): the Neg runs on B's (smaller) shape
    bwd = check_vjp(**CASES[name])
    producer = {o: n for n in bwd.graph.node for o in n.output}
    negs = [n for n in bwd.graph.node if n.op_type == "Neg"]
    assert len(negs) == 1 and producer[negs[0].input[0]].op_type in ("ReduceSum", "Reshape")


def test_engine_does_not_import_its_rules():
    import ast
    import pathlib

    import graphgen.autodiff

    tree = ast.parse(pathlib.Path(graphgen.autodiff.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not [x for x in names if "vjp_rules" in x]
