"""Whether a step graph lets a runner write each updated parameter over the old one.

A runner that binds the output ``new.<p>`` to the buffer holding the input ``<p>``
halves parameter memory (gpt2: 500 MB), but only if no node reads ``<p>`` after the
node that writes ``new.<p>`` has run. An engine runs a node only after the nodes it
depends on, so the update is safe when every reader of ``<p>`` is an ancestor of
that writer. In this project's train_step that holds because every update scales
its gradient by the clipping coefficient, which depends on the global gradient
norm, which depends on every gradient, and the gradients of the first layers and
the embeddings depend on every backward product that reads a weight. The builder
checks it on the graph it wrote rather than trusting that argument, and records
the answer in the manifest; runners read the manifest.
"""

from __future__ import annotations

import onnx


# Ops whose output an engine may make a view of their first input instead of a copy.
VIEW_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})


def parameters_updatable_in_place(model: onnx.ModelProto, params: list[str], new_name) -> bool:
    """True when, for every parameter ``p``, each node reading ``p`` is the writer of
    ``new_name(p)`` or one of its ancestors (nodes are in topological order, as ONNX
    requires). Ancestor sets are bitsets over node indices (Python ints)."""
    nodes = model.graph.node
    producer: dict[str, int] = {}
    ancestors: list[int] = []  # bit j of ancestors[i]: node j is an ancestor of node i
    for i, node in enumerate(nodes):
        mask = 0
        for x in node.input:
            j = producer.get(x)
            if j is not None:
                mask |= ancestors[j] | (1 << j)
        ancestors.append(mask)
        for o in node.output:
            producer[o] = i
    # A view op's output may share its input's buffer (ONNX Runtime aliases Reshape's),
    # so whoever reads a view of p reads p: follow views to their readers.
    alias_of: dict[str, str] = {p: p for p in params}
    readers: dict[str, list[int]] = {p: [] for p in params}
    for i, node in enumerate(nodes):
        for x in node.input:
            if x in alias_of:
                readers[alias_of[x]].append(i)
                if node.op_type in VIEW_OPS and x == node.input[0]:
                    alias_of[node.output[0]] = alias_of[x]
    for p in params:
        writer = producer.get(new_name(p))
        if writer is None:
            return False  # not updated by this graph: nothing to write in place
        if any(r != writer and not (ancestors[writer] >> r) & 1 for r in readers[p]):
            return False
    return True
