"""Reverse-mode automatic differentiation over ONNX graphs, in plain ONNX ops.

Design
------
The engine works directly on ``onnx`` protobufs (``onnx.helper``); no onnxscript
or onnx_ir is needed at this level.

1. Shape inference (with data propagation) on a copy of the forward model gives
   the element type and the rank of every value; dims are ints, symbolic names
   or unknown. Ranks must be static; dims need not be.
2. The *active* values are the floating-point values reachable from ``wrt``;
   the *useful* values are those the requested outputs depend on. A node is on a
   differentiable path when one of its inputs is active and one of its outputs is
   both active and useful. Integer/bool/shape sub-graphs (Shape, Range, masks,
   Cast to int, ...) are therefore never differentiated.
3. The on-path nodes are walked in reverse topological order. Each node's
   output cotangents are the sum of every contribution received (one ``Sum``
   node when a value is used more than once: tied weights get the sum; a
   gathered contribution is scattered into the others, see
   :func:`_sum_contributions`). The
   rule registered in :data:`RULES` for the node's op emits the
   vector-Jacobian-product nodes for its active inputs (see "Rules" below). An
   on-path op without a rule raises :class:`UnsupportedOpError` naming the op
   and the node.
4. Backward nodes are appended to ``model.graph.node`` (after every forward
   node, so the graph stays topologically sorted); constants become
   initializers named ``bw/c<N>`` (shared by value).

Rules
-----
A rule is ``fn(ctx, node, gouts)``: ``gouts[k]`` is the name of the cotangent of
``node.output[k]`` (or None when nothing downstream needs it); it returns (or
yields) one result per input, in input order: a value name, ``None`` (no
gradient) or :class:`Negated`. It may stop early (the remaining inputs get no
gradient) but never return more results than the node has inputs. Rules are
math only; the engine

* sums each cotangent down to its input's shape when the rule was registered
  with ``grad_like`` (ops that broadcast their inputs): ``grad_like(ctx, node, i)``
  names the forward value (or gives the dims) the cotangent of input ``i`` is
  shaped like, or None when it already has input ``i``'s shape. Statically equal
  shapes emit no node (:meth:`Ctx.reduce_to`);
* applies :class:`Negated` after that sum, on the smaller tensor;
* drops results for inputs that are not active.

The engine consumes a rule's results one at a time, so a rule written as a
generator has each input's reduction emitted right after that input's
cotangent, before the rule's nodes for the next input.

:data:`RULES` is filled by :mod:`graphgen.vjp_rules`, which registers into it with
:func:`rule`; this module imports nothing from there (the dependency runs one
way). The package's ``__init__`` imports the rules module, so importing any
``graphgen`` module leaves the table filled.

Public entry points: :func:`add_gradients` (scalar loss, seed 1) and
:func:`add_vjp` (any outputs, caller-supplied cotangent values).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT_TYPES = {
    TensorProto.FLOAT,
    TensorProto.DOUBLE,
    TensorProto.FLOAT16,
    TensorProto.BFLOAT16,
}


class UnsupportedOpError(ValueError):
    """An op on a differentiable path has no vector-Jacobian-product rule."""


class AutodiffError(ValueError):
    """The graph cannot be differentiated (unknown rank, bad name, ...)."""


# ---- the rule table -------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """A registered VJP rule: ``fn`` computes the input cotangents; ``grad_like``, when set,
    says what each one is shaped like (see the module docstring) so the engine sums it
    down to its input's shape."""
    fn: Callable
    grad_like: Callable | None = None


RULES: dict[str, Rule] = {}  # op_type (default domain) -> rule


def rule(*ops: str, grad_like: Callable | None = None):
    """Decorator registering ``fn`` as the VJP rule of each op in ``ops``."""
    def deco(fn):
        for op in ops:
            RULES[op] = Rule(fn, grad_like)
        return fn
    return deco


def like_output(ctx, node, i):
    """``grad_like`` for numpy-broadcasting ops: every input's cotangent comes back shaped
    like the node's output."""
    return node.output[0]


@dataclass(frozen=True)
class Negated:
    """A rule's result meaning "minus ``value``". Summing commutes with negation, so the
    engine negates after summing to the input's shape, where there are fewer elements."""
    value: str


@dataclass
class ValueType:
    elem_type: int
    dims: list | None  # entries: int (static), str (symbolic) or None (unknown); None: unknown rank


def _value_types(model: onnx.ModelProto) -> dict[str, ValueType]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # pragma: no cover - fall back to what the model declares
        inferred = model
    out: dict[str, ValueType] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            continue
        dims = None
        if tt.HasField("shape"):
            dims = []
            for d in tt.shape.dim:
                if d.HasField("dim_value"):
                    dims.append(int(d.dim_value))
                elif d.HasField("dim_param") and d.dim_param:
                    dims.append(d.dim_param)
                else:
                    dims.append(None)
        prev = out.get(vi.name)
        if prev is None or (prev.dims is None and dims is not None):
            out[vi.name] = ValueType(tt.elem_type, dims)
    for init in g.initializer:
        out[init.name] = ValueType(init.data_type, list(init.dims))
    return out


def _constant_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    vals = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value":
                    vals[n.output[0]] = numpy_helper.to_array(a.t)
                elif a.name == "value_float":
                    vals[n.output[0]] = np.array(a.f, dtype=np.float32)
                elif a.name == "value_int":
                    vals[n.output[0]] = np.array(a.i, dtype=np.int64)
                elif a.name == "value_floats":
                    vals[n.output[0]] = np.array(list(a.floats), dtype=np.float32)
                elif a.name == "value_ints":
                    vals[n.output[0]] = np.array(list(a.ints), dtype=np.int64)
    return vals


class Ctx:
    """What a VJP rule sees: helpers to emit nodes and to query forward values."""

    def __init__(self, model: onnx.ModelProto, prefix: str = "bw/"):
        self.model = model
        self.graph = model.graph
        self.prefix = prefix
        self.types = _value_types(model)
        self.consts = _constant_values(model)
        self._counter = 0
        self._const_cache: dict = {}
        self._shape_cache: dict[str, str] = {}
        self._names = {v for n in self.graph.node for v in list(n.input) + list(n.output)}
        self._names |= {v.name for v in self.graph.input} | {i.name for i in self.graph.initializer}
        self._names |= {n.name for n in self.graph.node}
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.node: onnx.NodeProto | None = None  # the forward node being differentiated
        self.active: set[str] = set()
        # value name -> the node producing it (forward nodes and every node emitted here)
        self.producer: dict[str, onnx.NodeProto] = {o: n for n in self.graph.node for o in n.output if o}

    # ---- names ---------------------------------------------------------------
    def fresh(self, hint: str = "t") -> str:
        while True:
            self._counter += 1
            name = f"{self.prefix}{hint}_{self._counter}"
            if name not in self._names:
                self._names.add(name)
                return name

    # ---- queries ---------------------------------------------------------------
    def vtype(self, name: str) -> ValueType:
        t = self.types.get(name)
        if t is None:
            raise AutodiffError(f"no type information for value {name!r} (node {self._node_label()})")
        return t

    def dtype(self, name: str) -> int:
        return self.vtype(name).elem_type

    def np_dtype(self, name: str):
        return helper.tensor_dtype_to_np_dtype(self.dtype(name))

    def dims(self, name: str) -> list:
        t = self.vtype(name)
        if t.dims is None:
            raise AutodiffError(f"rank of value {name!r} is unknown (node {self._node_label()}); "
                                "autodiff needs static ranks")
        return t.dims

    def rank(self, name: str) -> int:
        return len(self.dims(name))

    def static_shape(self, name: str):
        d = self.dims(name)
        return tuple(d) if all(isinstance(x, int) for x in d) else None

    def const_value(self, name: str):
        return self.consts.get(name)

    def needs(self, i: int) -> bool:
        n = self.node
        return i < len(n.input) and n.input[i] != "" and n.input[i] in self.active

    def attr(self, name: str, default=None):
        for a in self.node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def _node_label(self) -> str:
        if self.node is None:
            return "?"
        return f"{self.node.op_type} {self.node.name!r}"

    # ---- emission --------------------------------------------------------------
    def emit(self, op: str, inputs: list[str], n_out: int = 1, hint: str | None = None, **attrs):
        hint = hint or op.lower()
        outs = [self.fresh(hint) for _ in range(n_out)]
        node = helper.make_node(op, list(inputs), outs, name=self.fresh("n_" + op), **attrs)
        self.graph.node.append(node)
        for o in outs:
            self.producer[o] = node
        return outs[0] if n_out == 1 else outs

    def transpose_perm(self, name: str) -> list[int] | None:
        """The perm of the Transpose node producing ``name`` (None if another op produces it)."""
        n = self.producer.get(name)
        if n is None or n.op_type != "Transpose" or n.domain not in ("", "ai.onnx"):
            return None
        for a in n.attribute:
            if a.name == "perm":
                return list(a.ints)
        return list(range(self.rank(n.input[0])))[::-1]

    def const(self, value, dtype=None) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._const_cache:
            name = self.fresh("c")
            self.graph.initializer.append(numpy_helper.from_array(arr, name))
            self.types[name] = ValueType(helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape))
            self._const_cache[key] = name
        return self._const_cache[key]

    def scalar(self, value: float, like: str) -> str:
        """A rank-0 constant with the element type of value ``like``."""
        return self.const(np.array(value, dtype=self.np_dtype(like)))

    def ints(self, values) -> str:
        return self.const(np.array(list(values), dtype=np.int64))

    def shape(self, name: str) -> str:
        if name not in self._shape_cache:
            self._shape_cache[name] = self.emit("Shape", [name], hint="shape")
        return self._shape_cache[name]

    def shape_value(self, name: str) -> str:
        """The shape of ``name`` as a constant when fully static, else a Shape node."""
        s = self.static_shape(name)
        return self.ints(s) if s is not None else self.shape(name)

    def zeros_like(self, name: str) -> str:
        value = helper.make_tensor("value", self.dtype(name), [1], [0])
        return self.emit("ConstantOfShape", [self.shape_value(name)], hint="zeros", value=value)

    def reshape_like(self, g: str, like: str) -> str:
        return self.emit("Reshape", [g, self.shape_value(like)], hint="reshape")

    def norm_axis(self, axis: int, rank: int) -> int:
        return axis + rank if axis < 0 else axis

    def reduce(self, op: str, x: str, axes: list[int], keepdims: int = 1, hint: str | None = None) -> str:
        """A reduction whose axes are an input from opset 18 on (ReduceMean, ReduceSumSquare, ...)."""
        if self.opset >= 18:
            return self.emit(op, [x, self.ints(axes)], hint=hint, keepdims=keepdims)
        return self.emit(op, [x], hint=hint, axes=list(axes), keepdims=keepdims)

    def reduce_mean(self, x: str, axes: list[int], keepdims: int = 1) -> str:
        return self.reduce("ReduceMean", x, axes, keepdims, hint="mean")

    def reduce_sum(self, x: str, axes: list[int], keepdims: int = 1) -> str:
        return self.emit("ReduceSum", [x, self.ints(axes)], hint="sum", keepdims=keepdims)

    def reduce_to(self, g: str, target: str, primal: str) -> str:
        """Sum cotangent ``g`` (shaped like forward value ``primal``, or with dims ``primal``
        when a list is given) down to the shape of forward value ``target``, which was
        broadcast (numpy rules) into it. Static dims decide the summed axes at build
        time; where symbolic dims leave it open, the axes are computed at run time."""
        o_dims = self.dims(primal) if isinstance(primal, str) else list(primal)
        t_dims = self.dims(target)
        r_o, r_t = len(o_dims), len(t_dims)
        if r_t > r_o:
            raise AutodiffError(f"cannot reduce {primal!r} (rank {r_o}) to {target!r} (rank {r_t})")
        lead = r_o - r_t
        axes = list(range(lead))
        ambiguous = False
        for i, td in enumerate(t_dims):
            od = o_dims[lead + i]
            if td == 1:
                if od != 1:
                    axes.append(lead + i)
            elif isinstance(td, int):
                continue  # static dim > 1: the output dim equals it
            elif od == 1:
                continue
            elif isinstance(td, str) and td == od:
                continue
            else:
                ambiguous = True
        if ambiguous:
            return self._reduce_to_dynamic(g, target, r_o)
        if not axes:
            return g
        keep = [a for a in axes if a >= lead]
        if not keep:
            return self.emit("ReduceSum", [g, self.ints(axes)], hint="sum", keepdims=0)
        s = self.emit("ReduceSum", [g, self.ints(axes)], hint="sum", keepdims=1)
        return self.reshape_like(s, target)

    def _reduce_to_dynamic(self, g: str, target: str, r_o: int) -> str:
        r_t = self.rank(target)
        shp = self.shape(target)
        if r_o > r_t:
            shp = self.emit("Concat", [self.ints([1] * (r_o - r_t)), shp], axis=0)
        mask = self.emit("Equal", [shp, self.ints([1])], hint="is1")
        axes = self.emit("Compress", [self.ints(range(r_o)), mask], hint="axes", axis=0)
        s = self.emit("ReduceSum", [g, axes], hint="sum", keepdims=1, noop_with_empty_axes=1)
        return self.emit("Reshape", [s, self.shape(target)], hint="reshape")


def _topo_check(graph: onnx.GraphProto):
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    for n in graph.node:
        for x in n.input:
            if x not in known:
                raise AutodiffError(f"graph is not topologically sorted: {x!r} used by {n.op_type} {n.name!r} "
                                    "before it is produced")
        known.update(n.output)


def add_vjp(model: onnx.ModelProto, outputs: list[str], cotangents: list[str], wrt: list[str],
            prefix: str = "bw/") -> dict[str, str]:
    """Append to ``model.graph`` the nodes computing ``sum_k <cotangents[k], outputs[k]>``'s
    gradient with respect to each value in ``wrt``. The cotangent values must exist in
    the graph (inputs, initializers or node outputs) and have their output's shape.
    Returns {wrt_name: gradient value name}. Values of ``wrt`` that the outputs do not
    depend on get zeros. Mutates ``model`` in place."""
    graph = model.graph
    _topo_check(graph)
    ctx = Ctx(model, prefix)
    fwd_nodes = list(graph.node)
    for name in wrt:
        if name not in ctx.types:
            raise AutodiffError(f"cannot differentiate with respect to {name!r}: no such value in the graph")
        if ctx.dtype(name) not in FLOAT_TYPES:
            raise AutodiffError(f"cannot differentiate with respect to {name!r}: not a floating-point tensor")

    # forward reachability from wrt, restricted to float values
    active = set(wrt)
    for n in fwd_nodes:
        if any(x in active for x in n.input if x):
            for y in n.output:
                if y and y in ctx.types and ctx.dtype(y) in FLOAT_TYPES:
                    active.add(y)
    # backward reachability from outputs
    useful = set(outputs)
    for n in reversed(fwd_nodes):
        if any(y in useful for y in n.output if y):
            useful.update(x for x in n.input if x)
    ctx.active = active

    contributions: dict[str, list[str]] = defaultdict(list)
    for o, c in zip(outputs, cotangents, strict=True):
        contributions[o].append(c)

    def total(name: str):
        parts = contributions.get(name)
        if not parts:
            return None
        if len(parts) > 1:
            ctx.node = None
            contributions[name] = [_sum_contributions(ctx, parts)]
        return contributions[name][0]

    for n in reversed(fwd_nodes):
        if not any(x in active for x in n.input if x):
            continue
        if not any(y in active and y in useful for y in n.output if y):
            continue
        gouts = [total(y) if (y and y in active) else None for y in n.output]
        if all(g is None for g in gouts):
            continue
        entry = RULES.get(n.op_type) if n.domain in ("", "ai.onnx") else None
        if entry is None:
            dom = f" (domain {n.domain!r})" if n.domain not in ("", "ai.onnx") else ""
            raise UnsupportedOpError(
                f"no gradient rule for op {n.op_type}{dom} at node {n.name!r} "
                f"(inputs {list(n.input)}) on a path from the parameters to the loss")
        ctx.node = n
        results = iter(entry.fn(ctx, n, gouts))
        for i, gi in enumerate(results):
            if i >= len(n.input):
                got = i + 1 + sum(1 for _ in results)
                raise AutodiffError(f"the {n.op_type} rule returned {got} results for node {n.name!r}, "
                                    f"which has {len(n.input)} inputs")
            if gi is not None and n.input[i] in active:
                contributions[n.input[i]].append(_to_input_shape(ctx, entry, n, i, gi))
        ctx.node = None

    result = {}
    for name in wrt:
        g = total(name)
        if g is None:
            ctx.node = None
            g = ctx.zeros_like(name)
        result[name] = g
    _prune_backward(graph, len(fwd_nodes), set(result.values()))
    return result


def _to_input_shape(ctx: Ctx, entry: Rule, node: onnx.NodeProto, i: int, gi) -> str:
    """Rule result ``gi`` for ``node.input[i]`` as that input's cotangent: summed over the
    axes the input was broadcast along (per ``entry.grad_like``), then negated if asked."""
    neg = isinstance(gi, Negated)
    g = gi.value if neg else gi
    like = entry.grad_like(ctx, node, i) if entry.grad_like is not None else None
    if like is not None:
        g = ctx.reduce_to(g, node.input[i], like)
    return ctx.emit("Neg", [g]) if neg else g


def zeros_scatter_add(ctx: Ctx, g: str):
    """(indices, updates, axis) when ``g`` is ScatterElements(zeros, I, U, reduction="add"), the
    form the Gather and GatherElements rules give a gathered tensor's cotangent; else None.
    (The axis as the node states it, possibly negative.)"""
    n = ctx.producer.get(g)
    if n is None or n.op_type != "ScatterElements" or n.domain not in ("", "ai.onnx"):
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
    if attrs.get("reduction") not in ("add", b"add"):
        return None
    z = ctx.producer.get(n.input[0])
    if z is None or z.op_type != "ConstantOfShape":
        return None
    value = next((helper.get_attribute_value(a) for a in z.attribute if a.name == "value"), None)
    if value is None or np.any(numpy_helper.to_array(value) != 0):
        return None
    return n.input[1], n.input[2], attrs.get("axis", 0)


def _sum_contributions(ctx: Ctx, parts: list[str]) -> str:
    """The sum of a value's cotangent contributions (each already of the value's shape).

    A contribution that scatters updates into zeros (a gathered tensor: a tied embedding's
    rows) is added by scattering its updates into the sum of the others instead: no
    zeros tensor, no extra pass. That zeros tensor has the weight's static shape, so
    an engine folds it into a constant it keeps for the session (gpt2's embedding:
    147 MiB), and the Sum costs another tensor of that size."""
    scatters = [(p, zeros_scatter_add(ctx, p)) for p in parts]
    dense = [p for p, sc in scatters if sc is None]
    if not dense:
        dense, scatters = [parts[0]], [(p, zeros_scatter_add(ctx, p)) for p in parts[1:]]
    out = dense[0] if len(dense) == 1 else ctx.emit("Sum", dense, hint="gsum")
    for p, sc in scatters:
        if sc is not None:
            idx, upd, axis = sc
            out = ctx.emit("ScatterElements", [out, idx, upd], hint="gsum", axis=axis, reduction="add")
    return out


def _prune_backward(graph: onnx.GraphProto, n_forward: int, keep: set[str]) -> None:
    """Drop backward nodes (those after the first ``n_forward``) whose outputs nothing uses
    (a rule may emit a value that a later rule's peephole bypasses)."""
    needed = set(keep) | {o.name for o in graph.output}
    back = list(graph.node[n_forward:])
    kept = []
    for n in reversed(back):
        if any(o in needed for o in n.output if o):
            kept.append(n)
            needed.update(i for i in n.input if i)
    if len(kept) == len(back):
        return
    kept.reverse()
    del graph.node[n_forward:]
    graph.node.extend(kept)


def add_gradients(model: onnx.ModelProto, loss: str, wrt: list[str], prefix: str = "bw/",
                  grad_names: dict[str, str] | None = None) -> dict[str, str]:
    """Append the backward pass of scalar (or any-shape, summed) ``loss`` to ``model.graph``.

    Returns {param_name: gradient value name}. With ``grad_names`` ({param: name}),
    each gradient is also exposed under the given name through an Identity node.
    Mutates ``model`` in place; does not touch the graph's outputs."""
    ctx = Ctx(model, prefix + "seed_")
    if loss not in ctx.types:
        raise AutodiffError(f"loss value {loss!r} not found in the graph")
    if ctx.dtype(loss) not in FLOAT_TYPES:
        raise AutodiffError(f"loss value {loss!r} is not floating point")
    t = ctx.vtype(loss)
    if t.dims is not None and len(t.dims) == 0:
        seed = ctx.scalar(1.0, loss)
    else:
        value = helper.make_tensor("value", t.elem_type, [1], [1])
        seed = ctx.emit("ConstantOfShape", [ctx.shape(loss)], hint="ones", value=value)
    grads = add_vjp(model, [loss], [seed], wrt, prefix=prefix)
    if grad_names:
        for p, gname in grad_names.items():
            model.graph.node.append(helper.make_node("Identity", [grads[p]], [gname], name=f"{prefix}out/{gname}"))
            grads[p] = gname
    return grads
