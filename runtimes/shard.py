"""apply_step.onnx cut down to some of the parameters, for the sharded optimizer (ZeRO-1).

apply_step is, per parameter, an elementwise AdamW update (new.<p>, new.m.<p>, new.v.<p>
from <p>, m.<p>, v.<p>, grad.<p> and hp) plus one coupling: the clipping scale, from the
global norm of every gradient. Its subgraph from the owned parameters' p, m, v, *every*
gradient, hp and clip to grad_norm and the owned new.* is therefore the same computation,
node for node, restricted to those parameters: a rank runs it on its share and gets
bit for bit what the whole apply_step would give for them, with the moments of the other
parameters never allocated. Cut with onnx.utils.Extractor from the verified file; nothing
is built here (runners do not import graphgen).
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx.utils import Extractor

from contract import CLIP_INPUT, GRAD_NORM_OUTPUT, HP_INPUT, grad_name, m_name, new_m_name, new_name, new_v_name, v_name


def sharded_apply_model(path: Path, owned: list[str], all_names: list[str]) -> onnx.ModelProto:
    """apply_step.onnx's subgraph updating ``owned`` (in manifest order) from all gradients."""
    model = onnx.load(str(path))
    inputs = ([n for p in owned for n in (p, m_name(p), v_name(p))] + [grad_name(p) for p in all_names]
              + [HP_INPUT, CLIP_INPUT])
    outputs = [GRAD_NORM_OUTPUT] + [n for p in owned for n in (new_name(p), new_m_name(p), new_v_name(p))]
    sub = Extractor(model).extract_model(inputs, outputs)
    sub.ir_version = model.ir_version
    del sub.opset_import[:]
    sub.opset_import.extend(model.opset_import)
    return sub
