"""Assemble the portable ``train_step.onnx``: forward + backward + AdamW in standard ops.

    inputs : <p>... , m.<p>... , v.<p>... , tokens, positions, labels, hp (float32[7]), clip (float32)
    outputs: loss, grad_norm, new.<p>... , new.m.<p>... , new.v.<p>...

``clip`` is the global gradient-norm threshold (0 or inf: off) and ``grad_norm`` the
norm before clipping (see adamw.py).

The same step split in two, for gradient accumulation (the caller averages the
gradients of several micro-batches between them):

    grad_step.onnx : <p>..., tokens, positions, labels -> loss, grad.<p>...
    apply_step.onnx: <p>..., m.<p>..., v.<p>..., grad.<p>..., hp, clip
                     -> grad_norm, new.<p>..., new.m.<p>..., new.v.<p>...

apply_step holds the nodes of train_step's AdamW (adamw_nodes), so one apply on
train_step's own gradients is train_step's update.

``frozen`` names forward inputs that are read and never updated (a LoRA folder's
base weights): they come first among train_step's and grad_step's inputs, get no
gradient, no moments and no ``new.*`` output; apply_step never sees them.

The forward model (opset >= 16, default domain only) takes ``tokens``, ``positions``,
``labels`` and every parameter as graph inputs and outputs the scalar ``loss``.
"""

from __future__ import annotations

import copy

import onnx
from onnx import TensorProto, helper

from contract import (BATCH_INPUTS, CLIP_INPUT, GRAD_NORM_OUTPUT, HP_INPUT, HP_LAYOUT, IR_VERSION, grad_name, m_name,
                      new_m_name, new_name, new_v_name, v_name)
from graphgen.adamw import AdamWSlot, adamw_nodes
from graphgen.autodiff import AutodiffError, add_gradients

DATA_INPUTS = BATCH_INPUTS


def _check_forward(forward: onnx.ModelProto, param_names: list[str], float32: bool = True,
                   frozen: tuple[str, ...] = ()) -> onnx.ModelProto:
    model = copy.deepcopy(forward)
    g = model.graph
    names = [i.name for i in g.input]
    if len(set(param_names)) != len(param_names) or set(param_names) & set(frozen):
        raise AutodiffError("param_names has duplicates or names a frozen input")
    missing = [p for p in list(DATA_INPUTS) + list(param_names) + list(frozen) if p not in names]
    if missing:
        raise AutodiffError(f"forward graph lacks inputs {missing}")
    extra = [n for n in names if n not in DATA_INPUTS and n not in param_names and n not in frozen]
    if extra:
        raise AutodiffError(f"forward graph has inputs that are neither data nor parameters (nor frozen): {extra}")
    if [o.name for o in g.output][:1] != ["loss"]:
        raise AutodiffError(f"forward graph's first output must be 'loss', got {[o.name for o in g.output]}")
    domains = {o.domain for o in model.opset_import} | {n.domain for n in g.node}
    if domains - {"", "ai.onnx"}:
        raise AutodiffError(f"forward graph uses non-default domains {sorted(domains - {'', 'ai.onnx'})}")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 16:
        raise AutodiffError(f"forward graph must use opset >= 16 (ScatterElements reduction), got {opset}")
    for p in param_names:
        vi = next(i for i in g.input if i.name == p)
        et = vi.type.tensor_type.elem_type
        if (et != TensorProto.FLOAT) if float32 else (et not in (TensorProto.FLOAT, TensorProto.DOUBLE)):
            raise AutodiffError(f"parameter {p!r} must be float32{'' if float32 else ' or float64'}")
    return model


def _value_info(src: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    vi = copy.deepcopy(src)
    vi.name = name
    return vi


def build_grad_model(forward: onnx.ModelProto, param_names: list[str], frozen: tuple[str, ...] = ()
                     ) -> onnx.ModelProto:
    """Forward + backward: inputs as the forward's, outputs ``loss`` then ``grad.<p>``.
    Parameters may be float32 or float64 (float64 is for finite-difference tests)."""
    model = _check_forward(forward, param_names, float32=False, frozen=frozen)
    g = model.graph
    add_gradients(model, "loss", list(param_names), grad_names={p: grad_name(p) for p in param_names})
    inputs = {i.name: i for i in g.input}
    loss_vi = copy.deepcopy(g.output[0])
    del g.output[:]
    g.output.append(loss_vi)
    g.output.extend(_value_info(inputs[p], grad_name(p)) for p in param_names)
    model.ir_version = IR_VERSION
    return model


def build_train_step(forward: onnx.ModelProto, param_names: list[str], validate: bool = False,
                     frozen: tuple[str, ...] = ()) -> onnx.ModelProto:
    """The one-graph training step (see the module docstring for its signature).

    ``validate=True`` also runs ``onnx.checker.check_model(full_check=True)``."""
    model = _check_forward(forward, param_names, frozen=frozen)
    g = model.graph
    param_names = list(param_names)
    grads = add_gradients(model, "loss", param_names)

    slots = [AdamWSlot(p, grads[p], m_name(p), v_name(p), new_name(p), new_m_name(p), new_v_name(p))
             for p in param_names]
    nodes, inits = adamw_nodes(slots, hp=HP_INPUT, clip=CLIP_INPUT, grad_norm=GRAD_NORM_OUTPUT)
    g.node.extend(nodes)
    g.initializer.extend(inits)

    inputs = {i.name: copy.deepcopy(i) for i in g.input}
    del g.input[:]
    g.input.extend(inputs[f] for f in frozen)
    g.input.extend(inputs[p] for p in param_names)
    g.input.extend(_value_info(inputs[p], m_name(p)) for p in param_names)
    g.input.extend(_value_info(inputs[p], v_name(p)) for p in param_names)
    g.input.extend(inputs[n] for n in DATA_INPUTS)
    g.input.append(helper.make_tensor_value_info(HP_INPUT, TensorProto.FLOAT, [len(HP_LAYOUT)]))
    g.input.append(helper.make_tensor_value_info(CLIP_INPUT, TensorProto.FLOAT, []))

    loss_vi = copy.deepcopy(g.output[0])
    del g.output[:]
    g.output.append(loss_vi)
    g.output.append(helper.make_tensor_value_info(GRAD_NORM_OUTPUT, TensorProto.FLOAT, []))
    for name in (new_name, new_m_name, new_v_name):
        g.output.extend(_value_info(inputs[p], name(p)) for p in param_names)
    g.name = (g.name or "gpt2") + "_train_step"
    model.ir_version = IR_VERSION
    if validate:
        onnx.checker.check_model(model, full_check=True)
    return model


def build_grad_step(forward: onnx.ModelProto, param_names: list[str], frozen: tuple[str, ...] = ()
                    ) -> onnx.ModelProto:
    """``grad_step.onnx``: [frozen inputs,] float32 parameters, then the batch -> ``loss``, ``grad.<p>``."""
    _check_forward(forward, param_names, frozen=frozen)  # float32 only, as train_step
    model = build_grad_model(forward, param_names, frozen=frozen)
    g = model.graph
    inputs = {i.name: copy.deepcopy(i) for i in g.input}
    del g.input[:]
    g.input.extend(inputs[f] for f in frozen)
    g.input.extend(inputs[p] for p in param_names)
    g.input.extend(inputs[n] for n in DATA_INPUTS)
    g.name = (g.name or "gpt2") + "_grad_step"
    return model


def build_apply_step(forward: onnx.ModelProto, param_names: list[str], frozen: tuple[str, ...] = ()
                     ) -> onnx.ModelProto:
    """``apply_step.onnx``: train_step's clipping and AdamW on gradients given as inputs.
    ``forward`` supplies the parameters' shapes and the opset."""
    fwd = _check_forward(forward, param_names, frozen=frozen)  # frozen inputs are not apply_step's
    params = {i.name: i for i in fwd.graph.input if i.name in param_names}
    param_names = list(param_names)
    slots = [AdamWSlot(p, grad_name(p), m_name(p), v_name(p), new_name(p), new_m_name(p), new_v_name(p))
             for p in param_names]
    nodes, inits = adamw_nodes(slots, hp=HP_INPUT, clip=CLIP_INPUT, grad_norm=GRAD_NORM_OUTPUT)
    inputs = [_value_info(params[p], name(p)) for name in (str, m_name, v_name, grad_name) for p in param_names]
    inputs.append(helper.make_tensor_value_info(HP_INPUT, TensorProto.FLOAT, [len(HP_LAYOUT)]))
    inputs.append(helper.make_tensor_value_info(CLIP_INPUT, TensorProto.FLOAT, []))
    outputs = [helper.make_tensor_value_info(GRAD_NORM_OUTPUT, TensorProto.FLOAT, [])]
    outputs += [_value_info(params[p], name(p)) for name in (new_name, new_m_name, new_v_name) for p in param_names]
    graph = helper.make_graph(nodes, (fwd.graph.name or "gpt2") + "_apply_step", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[o for o in fwd.opset_import if o.domain in ("", "ai.onnx")],
                              producer_name=fwd.producer_name)
    model.ir_version = IR_VERSION
    return model
