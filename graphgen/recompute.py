"""Recompute the attention probabilities in the backward instead of keeping them.

The backward of ``P = softmax(q k^T * scale + mask)`` and of ``P v`` reads P, a
(B, H, T, T) tensor per layer (gpt2 at 1x1024: 50 MB a layer, 600 MB for 12), which
an engine must then keep from the forward until the backward reaches that layer.
This pass gives the backward its own copy of the chain from q and k (kept anyway,
(B, H, T, d_head)) to P, computed where the backward first needs it, as
flash-attention does; the forward's P is then dead after ``P v``. The cost is one
more ``q k^T`` product and softmax per layer.

The same holds for each layer's GELU output (B, T, 4 d_model), which the backward of
the projection after it reads: :func:`recompute_gelu` recomputes it from the GELU's
input, which the GELU's own backward keeps anyway (gpt2 at 1x1024: 12 MB a layer,
one elementwise pass each).

It rewrites a built step graph (train_step, grad_step): backward nodes are the ones
autodiff names ``bw/...``; the forward's softmax chain is walked back from each
Softmax to the MatMul that starts it.

:data:`KINDS` names what can be recomputed, :func:`default_recompute` what a build
recomputes unless told otherwise, and :func:`recompute` applies a list of kinds.
"""

from __future__ import annotations

import onnx

BACKWARD_PREFIX = "bw/"
PREFIX = "rc/"
CHAIN_OPS = frozenset({"MatMul", "Mul", "Div", "Add", "Sub", "Where", "Softmax"})
ZERO = PREFIX + "zero"


KINDS = ("attention", "gelu")
# The context from which a build recomputes both by default. The probabilities grow with
# the square of the context and everything else a layer keeps with the context: at gpt2's
# 1,024 they and the GELU outputs are 720 of the 1,630 MiB a 1x1024 step keeps, and
# recomputing them costs a few percent of the step; at 256 (small) they are a small share
# and recomputing them costs 2.7% of a step for little memory.
AUTO_CONTEXT = 1024


def default_recompute(context: int) -> list[str]:
    """What a build recomputes when not told (``graphgen build --recompute auto``)."""
    return list(KINDS) if context >= AUTO_CONTEXT else []


def checked_kinds(kinds) -> list[str]:
    """``kinds`` in KINDS' order, each once (as the manifest records them); ValueError naming any
    that is not one of KINDS."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"recompute: unknown {unknown}; choose from {list(KINDS)}")
    return [k for k in KINDS if k in kinds]


def recompute(model: onnx.ModelProto, kinds) -> onnx.ModelProto:
    """``model`` with the backward recomputing each of ``kinds`` (see KINDS; in place; returned)."""
    kinds = checked_kinds(kinds)
    if "attention" in kinds:
        recompute_attention(model)
    if "gelu" in kinds:
        recompute_gelu(model)
    return model


def _softmax_chain(s: onnx.NodeProto, producer: dict) -> list[onnx.NodeProto]:
    """The forward nodes from the attention score's MatMul to Softmax ``s``, Softmax first."""
    chain = [s]
    while chain[-1].op_type != "MatMul":
        up = producer.get(chain[-1].input[0])
        if up is None or up.op_type not in CHAIN_OPS or up.name.startswith(BACKWARD_PREFIX):
            raise ValueError(f"recompute: {s.name}'s input chain reaches {up.op_type if up else 'a graph input'}, "
                             "not the MatMul of an attention score")
        chain.append(up)
    return chain


def recompute_attention(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every backward reader of a forward Softmax output reading a copy
    recomputed from the inputs of the MatMul that begins its chain (in place; returned)."""
    return _recompute(model, "Softmax", _softmax_chain)


def recompute_gelu(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every backward reader of a forward Gelu output reading a Gelu
    recomputed from the same input (in place; returned)."""
    return _recompute(model, "Gelu", lambda s, producer: [s])


def _recompute(model: onnx.ModelProto, op_type: str, chain_of) -> onnx.ModelProto:
    """Give the backward readers of each forward ``op_type`` output a copy of ``chain_of(node)``
    (the node and the forward nodes up to the first input of the chain's last node, that node
    last), computed just before the first reader."""
    g = model.graph
    nodes = list(g.node)
    producer = {o: n for n in nodes for o in n.output}
    inserts: dict[int, list[onnx.NodeProto]] = {}  # index of the first backward reader -> copies before it
    renames: dict[int, dict[str, str]] = {}  # node index -> {old input: new input}
    taken = {n.name.rsplit("/", 1)[0] for n in nodes if n.name.startswith(PREFIX)}  # an earlier pass's views
    for s in nodes:
        if s.op_type != op_type or s.name.startswith(BACKWARD_PREFIX):
            continue
        readers = [i for i, n in enumerate(nodes) if n.name.startswith(BACKWARD_PREFIX) and s.output[0] in n.input]
        if not readers:
            continue
        chain = chain_of(s, producer)
        copied: dict[str, str] = {}
        copies = _after(chain[-1].input[0], _backward_input(nodes, readers, producer), copied, taken)
        for n in reversed(chain):  # the chain's first node first
            c = onnx.NodeProto()
            c.CopyFrom(n)
            c.name = PREFIX + n.name
            del c.input[:]
            c.input.extend(copied.get(x, x) for x in n.input)
            del c.output[:]
            for o in n.output:
                copied[o] = PREFIX + o
                c.output.append(copied[o])
            copies.append(c)
        inserts.setdefault(readers[0], []).extend(copies)
        for i in readers:
            renames.setdefault(i, {})[s.output[0]] = copied[s.output[0]]
    if inserts and ZERO not in {i.name for i in g.initializer}:
        g.initializer.append(onnx.helper.make_tensor(ZERO, onnx.TensorProto.INT64, [1], [0]))
    out = []
    for i, n in enumerate(nodes):
        out.extend(inserts.get(i, []))
        if i in renames:
            ins = [renames[i].get(x, x) for x in n.input]
            del n.input[:]
            n.input.extend(ins)
        out.append(n)
    del g.node[:]
    g.node.extend(out)
    return model


SHAPE_OPS = frozenset({"Shape", "Constant", "ConstantOfShape", "Concat", "Slice", "Squeeze", "Unsqueeze", "Range"})


def _backward_input(nodes, readers: list[int], producer: dict) -> str:
    """A backward tensor computed before the first reader of the value, which the readers'
    work needs anyway: an input of a reader, or of a backward node consuming a reader's
    output (the cotangent a MatMul's weight gradient multiplies by the value, say), traced
    up through backward nodes to one computed before the first reader."""
    first = readers[0]
    index = {id(n): i for i, n in enumerate(nodes)}
    outs = {o for i in readers for o in nodes[i].output}
    candidates = [x for i in readers for x in nodes[i].input]
    candidates += [x for n in nodes if n.name.startswith(BACKWARD_PREFIX) and outs & set(n.input)
                   for x in n.input if x not in outs]
    for x in candidates:
        seen = set()
        while x not in seen:
            seen.add(x)
            up = producer.get(x)
            if up is None or not up.name.startswith(BACKWARD_PREFIX) or up.op_type in SHAPE_OPS:
                break
            if index[id(up)] < first:
                return x
            x = up.input[0]
    raise ValueError(f"recompute: no backward tensor precedes {nodes[first].name}")


def _after(q: str, dep: str, copied: dict[str, str], taken: set[str]) -> list[onnx.NodeProto]:
    """Nodes making ``q`` available again only once ``dep`` exists, at no cost.

    An engine may run a node as soon as its inputs exist; a copy of the chain fed by
    the forward's q alone could run in the forward and hold its P just as long. A
    Reshape of q to its own shape, with an empty slice of dep's shape appended,
    is a view of q that waits for dep (not foldable: dep's shape is not constant)."""
    make = onnx.helper.make_node
    d, v = _fresh(PREFIX + dep, taken), _fresh(PREFIX + q, taken)  # a dep or q may serve twice
    n = [
        make("Shape", [dep], [d + "/dim"], start=-1),
        make("Slice", [d + "/dim", ZERO, ZERO], [d + "/none"]),
        make("Shape", [q], [v + "/shape"]),
        make("Concat", [v + "/shape", d + "/none"], [v + "/shape_after"], axis=0),
        make("Reshape", [q, v + "/shape_after"], [v + "/after"]),
    ]
    for node in n:
        node.name = node.output[0]
    copied[q] = v + "/after"
    return n


def _fresh(base: str, taken: set[str]) -> str:
    """``base``, or ``base`` with a number, not yet a prefix in ``taken`` (which records it)."""
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}#{k}"
    taken.add(name)
    return name
