"""Vector-Jacobian-product rules, one per ONNX op, registered into the engine's table
(:data:`graphgen.autodiff.RULES`) with :func:`graphgen.autodiff.rule`.

Each rule is ``rule(ctx, node, gouts)`` where ``gouts[k]`` is the name of the
cotangent of ``node.output[k]`` (or None when nothing downstream needs it); it
returns (or yields) per input that input's cotangent, None, or ``Negated(value)``,
and may stop after the last input that has one. The protocol is in
:mod:`graphgen.autodiff`'s docstring. Rules emit nodes only for the inputs
``ctx.needs(i)`` says are differentiable. Ops that broadcast register ``grad_like``:
their rules return cotangents shaped like the output (``unbroadcast`` in the
comments) and the engine sums each one down to its input's shape. Notation: ``g`` is
the output cotangent, ``Y`` the forward output.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from graphgen.autodiff import RULES, Ctx, Negated, UnsupportedOpError, like_output, rule, zeros_scatter_add

__all__ = ["RULES"]  # the engine's table, filled by this module's @rule registrations


def _unsupported(ctx: Ctx, node, why: str):
    raise UnsupportedOpError(f"no gradient rule for op {node.op_type} at node {node.name!r}: {why}")


# --------------------------------------------------------------------------- elementwise


@rule("Identity")
def vjp_identity(ctx, node, gouts):
    # Y = X  ->  gX = g
    return [gouts[0]]


@rule("Cast")
def vjp_cast(ctx, node, gouts):
    # Y = cast(X) between float types  ->  gX = cast(g) back to X's type
    x = node.input[0]
    if ctx.dtype(x) == ctx.dtype(node.output[0]):
        return [gouts[0]]
    return [ctx.emit("Cast", [gouts[0]], hint="cast", to=ctx.dtype(x))]


@rule("Neg")
def vjp_neg(ctx, node, gouts):
    # Y = -X  ->  gX = -g
    return [ctx.emit("Neg", [gouts[0]])]


@rule("Add", grad_like=like_output)
def vjp_add(ctx, node, gouts):
    # Y = A + B  ->  gA = unbroadcast(g), gB = unbroadcast(g)
    return [gouts[0], gouts[0]]


@rule("Sum", grad_like=like_output)
def vjp_sum(ctx, node, gouts):
    # Y = X0 + X1 + ...  ->  gXi = unbroadcast(g)
    return [gouts[0]] * len(node.input)


@rule("Sub", grad_like=like_output)
def vjp_sub(ctx, node, gouts):
    # Y = A - B  ->  gA = unbroadcast(g), gB = -unbroadcast(g)
    return [gouts[0], Negated(gouts[0])]


@rule("Mul", grad_like=like_output)
def vjp_mul(ctx, node, gouts):
    # Y = A * B  ->  gA = unbroadcast(g * B), gB = unbroadcast(g * A)
    # (a generator: each product is summed to its input's shape before the next is emitted)
    g = gouts[0]
    a, b = node.input
    yield ctx.emit("Mul", [g, b]) if ctx.needs(0) else None
    yield ctx.emit("Mul", [g, a]) if ctx.needs(1) else None


@rule("Div", grad_like=like_output)
def vjp_div(ctx, node, gouts):
    # Y = A / B  ->  gA = unbroadcast(g / B), gB = -unbroadcast((g / B) * Y)   (dY/dB = -A/B^2 = -Y/B)
    g, y = gouts[0], node.output[0]
    b = node.input[1]
    t = ctx.emit("Div", [g, b])
    yield t if ctx.needs(0) else None
    yield Negated(ctx.emit("Mul", [t, y])) if ctx.needs(1) else None


@rule("Pow", grad_like=like_output)
def vjp_pow(ctx, node, gouts):
    # Y = X ^ p (p not differentiable)  ->  gX = unbroadcast(g * p * X^(p-1))
    g = gouts[0]
    x, p = node.input
    if ctx.needs(1):
        _unsupported(ctx, node, "the exponent depends on a parameter (only constant exponents are supported)")
    pv = ctx.const_value(p)
    if pv is not None and pv.size == 1:
        pf = float(pv.reshape(()))
        if pf == 1.0:
            d = None
        elif pf == 2.0:
            d = ctx.emit("Mul", [x, ctx.scalar(2.0, x)])
        else:
            d = ctx.emit("Mul", [ctx.emit("Pow", [x, ctx.scalar(pf - 1.0, x)]), ctx.scalar(pf, x)])
    else:
        pm1 = ctx.emit("Sub", [p, ctx.const(np.array(1, dtype=ctx.np_dtype(p)))])
        pc = p if ctx.dtype(p) == ctx.dtype(x) else ctx.emit("Cast", [p], to=ctx.dtype(x))
        d = ctx.emit("Mul", [ctx.emit("Pow", [x, pm1]), pc])
    return [g if d is None else ctx.emit("Mul", [g, d])]


@rule("Tanh")
def vjp_tanh(ctx, node, gouts):
    # Y = tanh(X)  ->  gX = g * (1 - Y^2)
    y = node.output[0]
    d = ctx.emit("Sub", [ctx.scalar(1.0, y), ctx.emit("Mul", [y, y])])
    return [ctx.emit("Mul", [gouts[0], d])]


@rule("Sigmoid")
def vjp_sigmoid(ctx, node, gouts):
    # Y = sigmoid(X)  ->  gX = g * Y * (1 - Y)
    y = node.output[0]
    d = ctx.emit("Mul", [y, ctx.emit("Sub", [ctx.scalar(1.0, y), y])])
    return [ctx.emit("Mul", [gouts[0], d])]


@rule("Exp")
def vjp_exp(ctx, node, gouts):
    # Y = exp(X)  ->  gX = g * Y
    return [ctx.emit("Mul", [gouts[0], node.output[0]])]


@rule("Log")
def vjp_log(ctx, node, gouts):
    # Y = log(X)  ->  gX = g / X
    return [ctx.emit("Div", [gouts[0], node.input[0]])]


@rule("Sqrt")
def vjp_sqrt(ctx, node, gouts):
    # Y = sqrt(X)  ->  gX = g / (2 Y)
    y = node.output[0]
    return [ctx.emit("Div", [gouts[0], ctx.emit("Mul", [y, ctx.scalar(2.0, y)])])]


@rule("Reciprocal")
def vjp_reciprocal(ctx, node, gouts):
    # Y = 1/X  ->  gX = -g * Y^2
    y = node.output[0]
    return [ctx.emit("Neg", [ctx.emit("Mul", [gouts[0], ctx.emit("Mul", [y, y])])])]


@rule("Relu")
def vjp_relu(ctx, node, gouts):
    # Y = max(X, 0)  ->  gX = g where X > 0 else 0
    x = node.input[0]
    pos = ctx.emit("Greater", [x, ctx.scalar(0.0, x)])
    return [ctx.emit("Where", [pos, gouts[0], ctx.scalar(0.0, x)])]


@rule("Erf")
def vjp_erf(ctx, node, gouts):
    # Y = erf(X)  ->  gX = g * 2/sqrt(pi) * exp(-X^2)
    x = node.input[0]
    e = ctx.emit("Exp", [ctx.emit("Neg", [ctx.emit("Mul", [x, x])])])
    return [ctx.emit("Mul", [gouts[0], ctx.emit("Mul", [e, ctx.scalar(2.0 / np.sqrt(np.pi), x)])])]


@rule("Gelu")
def vjp_gelu(ctx, node, gouts):
    # Recomputes from X alone, so the forward keeps one tensor, not the formula's intermediates.
    # tanh:  Y = 0.5 X (1 + tanh(u)),  u = c (X + a X^3),  c = sqrt(2/pi),  a = 0.044715
    #        0.5 (1 + tanh(u)) = s = sigmoid(2u)  ->  gX = g * s * (1 + X (1 - s) (2c + 6ca X^2))
    #        (the sigmoid form: no 1 + tanh cancellation for very negative X, 13 passes)
    # none:  Y = X Phi(X)  ->  gX = g * (Phi(X) + X exp(-X^2/2) / sqrt(2 pi))
    x, g = node.input[0], gouts[0]
    x2 = ctx.emit("Mul", [x, x])
    if ctx.attr("approximate", "none") in ("tanh", b"tanh"):
        c, a = float(np.sqrt(2.0 / np.pi)), 0.044715
        two_u = ctx.emit("Mul", [x, ctx.emit("Add", [ctx.emit("Mul", [x2, ctx.scalar(2 * c * a, x)]),
                                                     ctx.scalar(2 * c, x)])])
        s = ctx.emit("Sigmoid", [two_u])
        k = ctx.emit("Add", [ctx.emit("Mul", [x2, ctx.scalar(6 * c * a, x)]), ctx.scalar(2 * c, x)])
        z = ctx.emit("Mul", [ctx.emit("Mul", [x, ctx.emit("Sub", [ctx.scalar(1.0, x), s])]), k])
        d = ctx.emit("Mul", [s, ctx.emit("Add", [z, ctx.scalar(1.0, x)])])
    else:
        phi = ctx.emit("Mul", [ctx.emit("Add", [ctx.emit("Erf", [ctx.emit("Mul", [x, ctx.scalar(np.sqrt(0.5), x)])]),
                                                ctx.scalar(1.0, x)]), ctx.scalar(0.5, x)])
        dens = ctx.emit("Mul", [ctx.emit("Exp", [ctx.emit("Mul", [x2, ctx.scalar(-0.5, x)])]),
                                ctx.scalar(1.0 / np.sqrt(2.0 * np.pi), x)])
        d = ctx.emit("Add", [phi, ctx.emit("Mul", [x, dens])])
    return [ctx.emit("Mul", [g, d])]


@rule("Where", grad_like=like_output)
def vjp_where(ctx, node, gouts):
    # Y = where(C, A, B)  ->  gA = unbroadcast(where(C, g, 0)), gB = unbroadcast(where(C, 0, g))
    g = gouts[0]
    c = node.input[0]
    zero = ctx.scalar(0.0, node.output[0])
    yield None  # C is a condition
    yield ctx.emit("Where", [c, g, zero]) if ctx.needs(1) else None
    yield ctx.emit("Where", [c, zero, g]) if ctx.needs(2) else None


@rule("Expand", grad_like=like_output)
def vjp_expand(ctx, node, gouts):
    # Y = broadcast(X, shape)  ->  gX = unbroadcast(g)
    return [gouts[0]]


# --------------------------------------------------------------------------- linear algebra


def _swap_last2(ctx, x: str) -> str:
    r = ctx.rank(x)
    perm = list(range(r - 2)) + [r - 1, r - 2]
    return ctx.emit("Transpose", [x], hint="T", perm=perm)


def _last_dim(ctx, x: str) -> str:
    """A 1-element int64 tensor holding the last dim of ``x``."""
    d = ctx.dims(x)[-1]
    if isinstance(d, int):
        return ctx.ints([d])
    return ctx.emit("Shape", [x], hint="lastdim", start=ctx.rank(x) - 1)


def _one_gemm(ctx, node) -> bool:
    """MatMul's A (..., M, K) with a 2-D B: gB is one GEMM over the flattened batch."""
    return ctx.rank(node.input[1]) == 2 and ctx.rank(node.input[0]) > 2


def _matmul_grad_like(ctx, node, i):
    # g @ B^T and A^T @ g carry Y's batch dims and the operand's matrix dims; the one-GEMM gB
    # already has B's shape
    if i == 1 and _one_gemm(ctx, node):
        return None
    return ctx.dims(node.output[0])[:-2] + ctx.dims(node.input[i])[-2:]


@rule("MatMul", grad_like=_matmul_grad_like)
def vjp_matmul(ctx, node, gouts):
    # Y = A @ B (batched, broadcast batch dims)
    #   gA = unbroadcast(g @ B^T),  gB = unbroadcast(A^T @ g)
    # A (..., M, K) with B (K, N): gB = reshape(A, (-1, K))^T @ reshape(g, (-1, N)) (one GEMM).
    # (a generator: gA is summed to A's shape before gB's nodes are emitted)
    g, y = gouts[0], node.output[0]
    a, b = node.input
    ra, rb = ctx.rank(a), ctx.rank(b)
    if ra < 2 or rb < 2:
        _unsupported(ctx, node, "MatMul with a 1-D operand")
    ydims = ctx.dims(y)
    yield ctx.emit("MatMul", [g, _swap_last2(ctx, b)]) if ctx.needs(0) else None
    if ctx.needs(1):
        if _one_gemm(ctx, node):
            neg1 = ctx.ints([-1])
            a2 = ctx.emit("Reshape", [a, ctx.emit("Concat", [neg1, _last_dim(ctx, a)], axis=0)
                                      if not isinstance(ctx.dims(a)[-1], int) else ctx.ints([-1, ctx.dims(a)[-1]])])
            g2 = ctx.emit("Reshape", [g, ctx.emit("Concat", [neg1, _last_dim(ctx, y)], axis=0)
                                      if not isinstance(ydims[-1], int) else ctx.ints([-1, ydims[-1]])])
            n_in, n_out = ctx.dims(b)[-2:]
            if ctx.transpose_perm(b) == [1, 0] and isinstance(n_in, int) and isinstance(n_out, int):
                # B = W^T (a linear layer, W stored (out, in)); K = prod(batch dims) rows.
                # gW = g2^T @ a2 contracts over K, the rows of both operands. ONNX Runtime fuses a
                # Transpose feeding a MatMul into FusedMatMul(transA), whose MLAS path runs at
                # 60-75% of a plain MatMul's rate here; an explicit transpose ORT does not fuse
                # (see _transpose_rows) plus a plain MatMul measured 20-35% faster for K >= 1024
                # and about even at K = 256. Transpose the narrower operand:
                if n_out <= n_in:  # gW = (g2^T) @ a2, already (out, in); the outer Transpose
                    # below cancels against the Transpose rule's, so gW needs no transpose at all
                    gw = ctx.emit("MatMul", [_transpose_rows(ctx, g2, n_out), a2])
                    gb = ctx.emit("Transpose", [gw], hint="T", perm=[1, 0])
                else:  # gB = gW^T = (a2^T) @ g2 (in, out); the Transpose rule turns it into gW
                    gb = ctx.emit("MatMul", [_transpose_rows(ctx, a2, n_in), g2])
            else:
                gb = ctx.emit("MatMul", [ctx.emit("Transpose", [a2], hint="T", perm=[1, 0]), g2])
        else:
            gb = ctx.emit("MatMul", [_swap_last2(ctx, a), g])
        yield gb


def _transpose_rows(ctx, x: str, d: int) -> str:
    """x (K, d) -> x^T (d, K), spelled (1, K, d) -perm [2, 0, 1]-> (d, 1, K) -> (d, K) so that
    ONNX Runtime's MatmulTransposeFusion (last-two-dims swaps only) leaves it a real transpose."""
    x3 = ctx.emit("Reshape", [x, ctx.ints([1, -1, d])])
    t = ctx.emit("Transpose", [x3], hint="T", perm=[2, 0, 1])
    return ctx.emit("Reshape", [t, ctx.ints([d, -1])])


@rule("Transpose")
def vjp_transpose(ctx, node, gouts):
    # Y = transpose(X, perm)  ->  gX = transpose(g, inverse(perm))
    r = ctx.rank(node.input[0])
    perm = ctx.attr("perm") or list(range(r))[::-1]
    inv = [0] * r
    for i, p in enumerate(perm):
        inv[p] = i
    g = gouts[0]
    if ctx.transpose_perm(g) == list(perm):  # g = transpose(h, perm): transpose(g, inv) is h itself
        return [ctx.producer[g].input[0]]
    return [ctx.emit("Transpose", [g], hint="T", perm=inv)]


# --------------------------------------------------------------------------- shape ops


@rule("Reshape", "Squeeze", "Unsqueeze", "Flatten")
def vjp_reshape(ctx, node, gouts):
    # Y = reshape(X)  ->  gX = reshape(g, shape(X))
    return [ctx.reshape_like(gouts[0], node.input[0])]


def _dim_along(ctx, x: str, axis: int) -> str:
    d = ctx.dims(x)[axis]
    if isinstance(d, int):
        return ctx.ints([d])
    return ctx.emit("Shape", [x], hint="dim", start=axis, end=axis + 1)


@rule("Concat")
def vjp_concat(ctx, node, gouts):
    # Y = concat(X0, X1, ..., axis)  ->  gXi = the matching slice of g (one Split)
    r = ctx.rank(node.output[0])
    axis = ctx.norm_axis(ctx.attr("axis"), r)
    sizes = [_dim_along(ctx, x, axis) for x in node.input]
    if all(ctx.const_value(s) is not None for s in sizes):
        split = ctx.ints([int(ctx.const_value(s)[0]) for s in sizes])
    else:
        split = ctx.emit("Concat", sizes, axis=0)
    if len(node.input) == 1:
        return [gouts[0]]
    parts = ctx.emit("Split", [gouts[0], split], n_out=len(node.input), hint="split", axis=axis)
    return [parts[i] if ctx.needs(i) else None for i in range(len(node.input))]


@rule("Split")
def vjp_split(ctx, node, gouts):
    # (Y0, Y1, ...) = split(X, axis)  ->  gX = concat(gY0, gY1, ...) (zeros for unused outputs)
    r = ctx.rank(node.input[0])
    axis = ctx.norm_axis(ctx.attr("axis", 0), r)
    parts = [g if g is not None else ctx.zeros_like(y) for g, y in zip(gouts, node.output)]
    gx = parts[0] if len(parts) == 1 else ctx.emit("Concat", parts, axis=axis)
    return [gx]


@rule("Slice")
def vjp_slice(ctx, node, gouts):
    # Y = X[starts:ends:steps]  ->  gX = zeros(X) with g scattered into the sliced positions.
    # The positions come from slicing an iota of X's flat indices the same way (exact for any
    # starts/ends/axes/steps); steps of 1 with constant bounds on static dims use Pad instead.
    x = node.input[0]
    g = gouts[0]
    r = ctx.rank(x)
    consts = [ctx.const_value(n) if n else None for n in node.input[1:]]
    while len(consts) < 4:
        consts.append(None)
    starts, ends, axes, steps = consts
    dims = ctx.dims(x)
    have_bounds = starts is not None and ends is not None and (len(node.input) < 4 or not node.input[3]
                                                                 or axes is not None)
    have_steps = len(node.input) < 5 or not node.input[4] or steps is not None
    if have_bounds and have_steps:
        axes_l = list(range(len(starts))) if axes is None else [ctx.norm_axis(int(a), r) for a in axes]
        steps_l = [1] * len(starts) if steps is None else [int(s) for s in steps]
        if all(s == 1 for s in steps_l) and all(isinstance(dims[a], int) for a in axes_l):
            pads = [0] * (2 * r)
            for a, s, e in zip(axes_l, starts, ends):
                n = dims[a]
                s, e = int(s), int(e)
                s = min(max(s + n if s < 0 else s, 0), n)
                e = min(max(e + n if e < 0 else e, 0), n)
                e = max(e, s)
                pads[a], pads[r + a] = s, n - e
            return [ctx.emit("Pad", [g, ctx.ints(pads), ctx.scalar(0.0, x)], mode="constant")]
    size = _numel(ctx, x, list(range(r)))  # scalar int64
    iota = ctx.emit("Range", [ctx.const(np.array(0, np.int64)), size, ctx.const(np.array(1, np.int64))])
    iota = ctx.emit("Reshape", [iota, ctx.shape(x)])
    picked = ctx.emit("Slice", [iota] + list(node.input[1:]))
    flat_idx = ctx.emit("Reshape", [picked, ctx.ints([-1])])
    flat_g = ctx.emit("Reshape", [g, ctx.ints([-1])])
    value = helper.make_tensor("value", ctx.dtype(x), [1], [0])
    zeros = ctx.emit("ConstantOfShape", [ctx.emit("Reshape", [size, ctx.ints([1])])], value=value)
    flat = ctx.emit("ScatterElements", [zeros, flat_idx, flat_g], axis=0)
    return [ctx.emit("Reshape", [flat, ctx.shape(x)])]


# --------------------------------------------------------------------------- reductions


def _numel(ctx, x: str, axes: list[int]) -> str:
    """Scalar int64: the product of ``x``'s dims along ``axes`` (non-negative). Static dims
    fold into a constant; the others come from Shape + ReduceProd (not Size, which some
    runtimes return as a host integer rather than a tensor)."""
    dims = ctx.dims(x)
    static = int(np.prod([dims[a] for a in axes if isinstance(dims[a], int)]))
    dynamic = [a for a in axes if not isinstance(dims[a], int)]
    if not dynamic:
        return ctx.const(np.array(static, np.int64))
    shp = ctx.shape(x)  # (rank,)
    if len(dynamic) < len(dims):
        shp = ctx.emit("Gather", [shp, ctx.ints(dynamic)], hint="dims", axis=0)  # (len(dynamic),)
    n = ctx.emit("ReduceProd", [shp], hint="numel", keepdims=0)  # scalar
    return n if static == 1 else ctx.emit("Mul", [n, ctx.const(np.array(static, np.int64))])


def _unsqueeze_expand(ctx, g: str, x: str, axes: list[int] | str | None, keepdims: int) -> str:
    if not keepdims and axes is not None:
        ax = axes if isinstance(axes, str) else ctx.ints(axes)
        g = ctx.emit("Unsqueeze", [g, ax])
    return ctx.emit("Expand", [g, ctx.shape_value(x)])


@rule("ReduceSum")
def vjp_reduce_sum(ctx, node, gouts):
    # Y = sum(X, axes)  ->  gX = expand(unsqueeze(g, axes), shape(X))
    x = node.input[0]
    keepdims = ctx.attr("keepdims", 1)
    noop = ctx.attr("noop_with_empty_axes", 0)
    if ctx.opset >= 13:
        axes_in = node.input[1] if len(node.input) > 1 and node.input[1] else None
        axes = None
        if axes_in is not None:
            av = ctx.const_value(axes_in)
            axes = axes_in if av is None else [int(a) for a in av.reshape(-1)]
    else:
        axes = ctx.attr("axes")
    if axes is not None and not isinstance(axes, str) and len(axes) == 0:
        axes = None
    if axes is None and noop:
        return [gouts[0]]
    if isinstance(axes, (list, tuple)):
        axes = [ctx.norm_axis(a, ctx.rank(x)) for a in axes]
    return [_unsqueeze_expand(ctx, gouts[0], x, axes, keepdims)]


def _constant_axes(ctx, node) -> tuple[list[int] | None, bool]:
    """(axes, noop) of a reduction whose axes are constant: an input from opset 18 on, an
    attribute before; axes None means every axis, unless noop (empty axes with
    noop_with_empty_axes: the identity)."""
    if ctx.opset >= 18:
        axes_in = node.input[1] if len(node.input) > 1 and node.input[1] else None
        av = ctx.const_value(axes_in) if axes_in else None
        if axes_in and av is None:
            _unsupported(ctx, node, f"{node.op_type} with non-constant axes")
        axes = None if av is None or av.size == 0 else [int(a) for a in av.reshape(-1)]
        return axes, axes is None and bool(ctx.attr("noop_with_empty_axes", 0))
    axes = ctx.attr("axes")
    return (list(axes) if axes else None), False


@rule("ReduceMean")
def vjp_reduce_mean(ctx, node, gouts):
    # Y = mean(X, axes)  ->  gX = expand(unsqueeze(g, axes), shape(X)) / N,  N = prod(X's dims on axes)
    x = node.input[0]
    keepdims = ctx.attr("keepdims", 1)
    axes, noop = _constant_axes(ctx, node)
    if noop:
        return [gouts[0]]
    r = ctx.rank(x)
    red = list(range(r)) if axes is None else [ctx.norm_axis(a, r) for a in axes]
    dims = ctx.dims(x)
    if all(isinstance(dims[a], int) for a in red):
        n = int(np.prod([dims[a] for a in red])) if red else 1
        scaled = ctx.emit("Mul", [gouts[0], ctx.scalar(1.0 / n, x)])
    else:
        n = _numel(ctx, x, red)
        scaled = ctx.emit("Div", [gouts[0], ctx.emit("Cast", [n], to=ctx.dtype(x))])
    axes = None if axes is None else red
    return [_unsqueeze_expand(ctx, scaled, x, axes, keepdims)]


@rule("ReduceLogSumExp")
def vjp_reduce_log_sum_exp(ctx, node, gouts):
    # Y = log(sum(exp(X), axes))  ->  gX = g * exp(X - Y), g and Y broadcast over the reduced axes.
    # Read from X and Y, so the backward keeps X (a cross-entropy's logits) and no copy of it.
    x, y, g = node.input[0], node.output[0], gouts[0]
    keepdims = ctx.attr("keepdims", 1)
    axes, noop = _constant_axes(ctx, node)
    if noop:
        _unsupported(ctx, node, "ReduceLogSumExp with noop_with_empty_axes")
    if not keepdims and axes is not None:  # reduced to rank 0 when axes is None: broadcasts as it is
        ax = ctx.ints([ctx.norm_axis(a, ctx.rank(x)) for a in axes])
        y, g = ctx.emit("Unsqueeze", [y, ax]), ctx.emit("Unsqueeze", [g, ax])
    if axes is not None and len(axes) == 1:
        # exp(X - Y) over one axis is softmax(X) along it: one new X-sized tensor where
        # Sub then Exp make two (gpt2 at 1x1024: 196 MiB each), Y unread
        return [ctx.emit("Mul", [ctx.emit("Softmax", [x], axis=ctx.norm_axis(axes[0], ctx.rank(x))), g])]
    return [ctx.emit("Mul", [ctx.emit("Exp", [ctx.emit("Sub", [x, y])]), g])]


# --------------------------------------------------------------------------- normalisation / softmax


@rule("Softmax")
def vjp_softmax(ctx, node, gouts):
    # Y = softmax(X, axis)  ->  gX = Y * (g - sum(g * Y, axis))
    if ctx.opset < 13:
        _unsupported(ctx, node, "Softmax before opset 13 (2-D coercion semantics)")
    y, g = node.output[0], gouts[0]
    axis = ctx.norm_axis(ctx.attr("axis", -1), ctx.rank(y))
    s = ctx.reduce_sum(ctx.emit("Mul", [g, y]), [axis], keepdims=1)
    return [ctx.emit("Mul", [y, ctx.emit("Sub", [g, s])])]


@rule("LogSoftmax")
def vjp_log_softmax(ctx, node, gouts):
    # Y = log_softmax(X, axis)  ->  gX = g - exp(Y) * sum(g, axis)
    if ctx.opset < 13:
        _unsupported(ctx, node, "LogSoftmax before opset 13 (2-D coercion semantics)")
    y, g = node.output[0], gouts[0]
    axis = ctx.norm_axis(ctx.attr("axis", -1), ctx.rank(y))
    sparse = _scatter_into_zeros(ctx, g, axis, y)
    if sparse is not None:
        # g = scatter_add(0, I, U) along the axis (a picked log-probability's cotangent, as in
        # cross-entropy): sum(g, axis) = sum(U, axis), and gX = scatter_add(-exp(Y) * sum(U), I, U).
        # Three passes over the (B, T, V) logits instead of six, and no zeros tensor.
        idx, upd = sparse
        s = ctx.emit("Neg", [ctx.reduce_sum(upd, [axis], keepdims=1)])
        base = ctx.emit("Mul", [ctx.emit("Exp", [y]), s])
        return [ctx.emit("ScatterElements", [base, idx, upd], axis=axis, reduction="add")]
    s = ctx.reduce_sum(g, [axis], keepdims=1)
    return [ctx.emit("Sub", [g, ctx.emit("Mul", [ctx.emit("Exp", [y]), s])])]


def _scatter_into_zeros(ctx, g: str, axis: int, like: str):
    """(indices, updates) when ``g`` is exactly the GatherElements rule's scatter_add(zeros, I, U)
    along ``axis`` and I (so U) has ``like``'s dims off that axis; else None."""
    found = zeros_scatter_add(ctx, g)
    if found is None:
        return None
    idx, upd, at = found  # upd: a cotangent (untyped): it has the indices' shape, a forward value's
    r = ctx.rank(like)
    if ctx.norm_axis(at, r) != ctx.norm_axis(axis, r) or idx not in ctx.types:
        return None
    du, dl = ctx.dims(idx), ctx.dims(like)
    a = ctx.norm_axis(axis, r)
    if len(du) != r or any(du[i] != dl[i] or du[i] is None for i in range(r) if i != a):
        return None
    return idx, upd


def _layer_norm_grad_like(ctx, node, i):
    # S and B broadcast into X's shape; gX already has it
    return node.input[0] if i > 0 else None


@rule("LayerNormalization", grad_like=_layer_norm_grad_like)
def vjp_layer_norm(ctx, node, gouts):
    # Y = xhat * S + B,  xhat = (X - mean) * rstd,  rstd = 1/sqrt(var + eps)  (over axes >= axis)
    #   gB = unbroadcast(g),  gS = unbroadcast(g * xhat),  gxhat = g * S
    #   gX = rstd * (gxhat - mean(gxhat) - xhat * mean(gxhat * xhat))
    # Only Y's cotangent is supported (Mean / InvStdDev are statistics, not model outputs).
    if any(g is not None for g in gouts[1:]):
        _unsupported(ctx, node, "gradient through the Mean/InvStdDev outputs")
    x, s = node.input[0], node.input[1]
    b = node.input[2] if len(node.input) > 2 and node.input[2] else None
    g = gouts[0]
    r = ctx.rank(x)
    axis = ctx.norm_axis(ctx.attr("axis", -1), r)
    red = list(range(axis, r))
    eps = ctx.attr("epsilon", 1e-5)
    outs = list(node.output)
    if len(outs) >= 3 and outs[1] and outs[2] and ctx.dtype(outs[2]) == ctx.dtype(x):
        mean, rstd = outs[1], outs[2]
        xc = ctx.emit("Sub", [x, mean])
    else:  # recompute the statistics from X, in X's own precision (a node declaring only Y)
        # Two read-only passes over X's size beyond what the saved statistics would cost:
        # the mean, and the sum of squares of the centred X (which xhat needs anyway).
        mean = ctx.reduce_mean(x, red)
        xc = ctx.emit("Sub", [x, mean])
        sumsq = ctx.reduce("ReduceSumSquare", xc, red, hint="sumsq")  # (..., 1, ...) like mean
        dims = ctx.dims(x)
        if all(isinstance(dims[a], int) for a in red):
            var = ctx.emit("Mul", [sumsq, ctx.scalar(1.0 / np.prod([dims[a] for a in red]), x)])
        else:
            var = ctx.emit("Div", [sumsq, ctx.emit("Cast", [_numel(ctx, x, red)], to=ctx.dtype(x))])
        rstd = ctx.emit("Reciprocal", [ctx.emit("Sqrt", [ctx.emit("Add", [var, ctx.scalar(eps, x)])])])
    xhat = ctx.emit("Mul", [xc, rstd], hint="xhat")
    gx = gs = None
    if ctx.needs(0):
        gxhat = ctx.emit("Mul", [g, s])
        m1 = ctx.reduce_mean(gxhat, red)
        m2 = ctx.reduce_mean(ctx.emit("Mul", [gxhat, xhat]), red)
        inner = ctx.emit("Sub", [ctx.emit("Sub", [gxhat, m1]), ctx.emit("Mul", [xhat, m2])])
        gx = ctx.emit("Mul", [inner, rstd])
    if ctx.needs(1):
        gs = ctx.emit("Mul", [g, xhat])
    return [gx, gs] if b is None else [gx, gs, g]


# --------------------------------------------------------------------------- gathers


@rule("Gather")
def vjp_gather(ctx, node, gouts):
    # Y = take(D, I, axis)  ->  gD = zeros(D) with g added at rows I. Negative indices are wrapped
    # first; axis != 0 is moved to the front with Transposes.
    # The add is a ScatterElements along axis 0 with each row's index repeated across the row,
    # not a ScatterND: onnxruntime's CPU ScatterND (1.19 and 1.32 alike) splits the updates
    # across threads with no care for repeated indices, so with 2+ threads it loses additions
    # to a race whenever a token repeats (tests/test_autodiff_rules.py shows it). ScatterElements
    # with reduction="add" runs serially and is exact.
    d, idx = node.input
    g = gouts[0]
    rd = ctx.rank(d)
    axis = ctx.norm_axis(ctx.attr("axis", 0), rd)
    if ctx.dtype(idx) != 7:  # int32 indices -> int64
        idx = ctx.emit("Cast", [idx], to=7)
    iv = ctx.const_value(node.input[1])
    if iv is None or (iv < 0).any():
        dim = ctx.dims(d)[axis]
        n = ctx.const(np.array(dim, np.int64)) if isinstance(dim, int) else \
            ctx.emit("Squeeze", [_dim_along(ctx, d, axis), ctx.ints([0])])
        neg = ctx.emit("Less", [idx, ctx.const(np.array(0, np.int64))])
        idx = ctx.emit("Where", [neg, ctx.emit("Add", [idx, n]), idx])
    if axis == 0:
        return [_scatter_add_rows(ctx, ctx.zeros_like(d), idx, g, ctx.dims(d)[1:])]
    # move the gathered axis to the front: D' = transpose(D, [axis, 0..axis-1, axis+1..])
    ri = ctx.rank(node.input[1])
    perm_d = [axis] + list(range(axis)) + list(range(axis + 1, rd))
    # g has dims D[:axis] + I + D[axis+1:]; bring I's dims to the front
    perm_g = list(range(axis, axis + ri)) + list(range(axis)) + list(range(axis + ri, rd - 1 + ri))
    zt = ctx.emit("Transpose", [ctx.zeros_like(d)], perm=perm_d)
    gt = ctx.emit("Transpose", [g], perm=perm_g)
    acc = _scatter_add_rows(ctx, zt, idx, gt, [ctx.dims(d)[i] for i in perm_d[1:]])
    inv = [0] * rd
    for i, p in enumerate(perm_d):
        inv[p] = i
    return [ctx.emit("Transpose", [acc], perm=inv)]


def _scatter_add_rows(ctx, zeros: str, idx: str, g: str, row_dims: list) -> str:
    """zeros (N, *R) with g (*I, *R) added at rows idx (*I), R = row_dims: flatten to K = prod(I)
    rows and ScatterElements(axis=0, reduction="add") with each row's index expanded over R."""
    row_dims = list(row_dims)
    if all(isinstance(x, int) for x in row_dims):
        rows_shape = ctx.ints([-1] + row_dims)
    else:
        rest = ctx.emit("Shape", [zeros], hint="rowdims", start=1)
        rows_shape = ctx.emit("Concat", [ctx.ints([-1]), rest], axis=0)
    g2 = ctx.emit("Reshape", [g, rows_shape])  # (K, *R)
    i2 = ctx.emit("Reshape", [idx, ctx.ints([-1] + [1] * len(row_dims))])  # (K, 1, ...)
    i2 = ctx.emit("Expand", [i2, ctx.emit("Shape", [g2])])  # (K, *R)
    return ctx.emit("ScatterElements", [zeros, i2, g2], axis=0, reduction="add")


@rule("GatherElements")
def vjp_gather_elements(ctx, node, gouts):
    # Y[i][j] = D[i][I[i][j]] (along axis)  ->  gD = scatter_add(zeros(D), I, g, axis)
    d, idx = node.input
    axis = ctx.norm_axis(ctx.attr("axis", 0), ctx.rank(d))
    zeros = ctx.zeros_like(d)
    return [ctx.emit("ScatterElements", [zeros, idx, gouts[0]], axis=axis, reduction="add")]
