"""Recompute the attention probabilities in the backward instead of keeping them.

The backward of ``P = softmax(q k^T * scale + mask)`` and of ``P v`` reads P, a
(B, H, T, T) tensor per layer (gpt2 at 1x1024: 50 MB a layer, 600 MB for 12), which
an engine must then keep from the forward until the backward reaches that layer.
This pass gives the backward its own copy of the chain from q and k (kept anyway,
(B, H, T, d_head)) to P, computed where the backward first needs it, as
flash-attention does; the forward's P is then dead after ``P v``. The cost is one
more ``q k^T`` product and softmax per layer.

It rewrites a built step graph (train_step, grad_step): backward nodes are the ones
autodiff names ``bw/...``; the forward's softmax chain is walked back from each
Softmax to the MatMul that starts it.
"""

from __future__ import annotations

import onnx

BACKWARD_PREFIX = "bw/"
PREFIX = "rc/"
CHAIN_OPS = frozenset({"MatMul", "Mul", "Div", "Add", "Sub", "Where", "Softmax"})
ZERO = PREFIX + "zero"


def recompute_attention(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every backward reader of a forward Softmax output reading a copy
    recomputed from the inputs of the MatMul that begins its chain (in place; returned)."""
    g = model.graph
    nodes = list(g.node)
    producer = {o: n for n in nodes for o in n.output}
    inserts: dict[int, list[onnx.NodeProto]] = {}  # index of the first backward reader -> copies before it
    renames: dict[int, dict[str, str]] = {}  # node index -> {old input: new input}
    for s in nodes:
        if s.op_type != "Softmax" or s.name.startswith(BACKWARD_PREFIX):
            continue
        readers = [i for i, n in enumerate(nodes) if n.name.startswith(BACKWARD_PREFIX) and s.output[0] in n.input]
        if not readers:
            continue
        chain = [s]
        while chain[-1].op_type != "MatMul":
            up = producer.get(chain[-1].input[0])
            if up is None or up.op_type not in CHAIN_OPS or up.name.startswith(BACKWARD_PREFIX):
                raise ValueError(f"recompute: {s.name}'s input chain reaches {up.op_type if up else 'a graph input'}, "
                                 "not the MatMul of an attention score")
            chain.append(up)
        copied: dict[str, str] = {}
        copies = _after(chain[-1].input[0], _backward_input(nodes, readers, producer), copied)
        for n in reversed(chain):  # MatMul first
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
    if inserts:
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


def _backward_input(nodes, readers: list[int], producer: dict) -> str:
    """A tensor the backward computes before its first read of P (the readers' own inputs)."""
    first = readers[0]
    index = {id(n): i for i, n in enumerate(nodes)}
    for i in readers:
        for x in nodes[i].input:
            up = producer.get(x)
            if up is not None and up.name.startswith(BACKWARD_PREFIX) and index[id(up)] < first:
                return x
    raise ValueError(f"recompute: no backward tensor precedes {nodes[first].name}")


def _after(q: str, dep: str, copied: dict[str, str]) -> list[onnx.NodeProto]:
    """Nodes making ``q`` available again only once ``dep`` exists, at no cost.

    An engine may run a node as soon as its inputs exist; a copy of the chain fed by
    the forward's q alone could run in the forward and hold its P just as long. A
    Reshape of q to its own shape, with an empty slice of dep's shape appended,
    is a view of q that waits for dep (not foldable: dep's shape is not constant)."""
    make = onnx.helper.make_node
    n = [
        make("Shape", [dep], [PREFIX + dep + "/dim"], start=-1),
        make("Slice", [PREFIX + dep + "/dim", ZERO, ZERO], [PREFIX + dep + "/none"]),
        make("Shape", [q], [PREFIX + q + "/shape"]),
        make("Concat", [PREFIX + q + "/shape", PREFIX + dep + "/none"], [PREFIX + q + "/shape_after"], axis=0),
        make("Reshape", [q, PREFIX + q + "/shape_after"], [PREFIX + q + "/after"]),
    ]
    for node in n:
        node.name = node.output[0]
    copied[q] = PREFIX + q + "/after"
    return n
