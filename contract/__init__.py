"""The artifact contract: what the builder writes and every runner and host reads.

One owner for each fact of it. The constants (format name and version, opsets,
IR version, hp layout, name templates, models and their roles) live in
``constants.json`` and the manifest's structure in ``manifest.schema.json``;
this package and the JavaScript hosts (hosts/common) read those two files, and
``vectors/`` holds the cases both implementations are tested against. The
package also holds what the builder and the runners both need (hashing, atomic
writes, bounded JSON, the onnxruntime import helper) and depends on neither.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONSTANTS: dict = json.loads((HERE / "constants.json").read_text())
SCHEMA: dict = json.loads((HERE / "manifest.schema.json").read_text())

MANIFEST_FORMAT: str = CONSTANTS["format"]
MANIFEST_VERSION: int = CONSTANTS["format_version"]
# A folder with frozen inputs (LoRA) is written as this version, so that readers which
# predate frozen inputs refuse it by its version rather than train it wrong.
FROZEN_MANIFEST_VERSION: int = CONSTANTS["frozen_format_version"]
RETIRED_VERSIONS: dict[int, str] = {int(k): v for k, v in CONSTANTS["retired_versions"].items()}
IR_VERSION: int = CONSTANTS["ir_version"]  # onnxruntime 1.19 reads IR <= 10; onnx 1.23 would write 11+
OPSET: int = CONSTANTS["opset"]  # train_step.onnx, forward.onnx
TRAINING_SET_OPSET: int = CONSTANTS["training_set_opset"]
CONFIG_SIZES: tuple[str, ...] = tuple(CONSTANTS["config_sizes"])
CONFIG_KEYS: tuple[str, ...] = tuple(CONSTANTS["config_keys"])
LABEL_MODES: tuple[str, ...] = tuple(CONSTANTS["label_modes"])
HP_INPUT: str = CONSTANTS["hp"]["input"]
HP_LAYOUT: tuple[str, ...] = tuple(CONSTANTS["hp"]["layout"])
HP_RTOL: float = CONSTANTS["hp"]["rtol"]
CLIP_INPUT: str = CONSTANTS["clip"]["input"]
GRAD_NORM_OUTPUT: str = CONSTANTS["clip"]["norm_output"]
CLIP_EPS: float = CONSTANTS["clip"]["eps"]
BATCH_INPUTS: tuple[str, ...] = tuple(CONSTANTS["batch_inputs"])
LOSS_OUTPUT: str = CONSTANTS["loss_output"]
LOGITS_OUTPUT: str = CONSTANTS["logits_output"]
DENSE_SUM_TOL: float = CONSTANTS["dense_sum_tol"]
TRAINING_FILES: tuple[str, ...] = tuple(CONSTANTS["training_set"])
_NAMES: dict[str, str] = CONSTANTS["names"]
TOKENIZER_KINDS: tuple[str, ...] = tuple(CONSTANTS["tokenizer"]["kinds"])
TOKENIZER_FILE: str = CONSTANTS["tokenizer"]["file"]
BYTES_VOCAB_SIZE: int = CONSTANTS["tokenizer"]["bytes_vocab_size"]
SOURCE_KINDS: tuple[str, ...] = tuple(CONSTANTS["source_kinds"])
HF_EXPORT_MARKER: str = CONSTANTS["hf_export"]["marker"]
HF_EXPORT_FORMAT: str = CONSTANTS["hf_export"]["format"]
KV_KINDS: tuple[str, ...] = tuple(CONSTANTS["kv_cache"]["kinds"])
LORA_TARGETS: tuple[str, ...] = tuple(CONSTANTS["lora"]["targets"])
BASE_FILE: str = CONSTANTS["lora"]["base_file"]


def grad_name(p: str) -> str:
    """grad_step output and apply_step input holding d loss / d parameter ``p``."""
    return _NAMES["grad"].format(p=p)


def m_name(p: str) -> str:
    """train_step input holding AdamW's first moment of parameter ``p``."""
    return _NAMES["m"].format(p=p)


def v_name(p: str) -> str:
    return _NAMES["v"].format(p=p)


def new_name(p: str) -> str:
    """train_step output holding parameter ``p`` after the update."""
    return _NAMES["new_param"].format(p=p)


def new_m_name(p: str) -> str:
    return _NAMES["new_m"].format(p=p)


def new_v_name(p: str) -> str:
    return _NAMES["new_v"].format(p=p)


def past_name(layer: int, kind: str) -> str:
    """decoder.onnx input holding layer ``layer``'s cached keys or values (``kind`` of KV_KINDS)."""
    return CONSTANTS["kv_cache"]["past"].format(layer=layer, kind=kind)


def present_name(layer: int, kind: str) -> str:
    """decoder.onnx output: the cache of ``past_name(layer, kind)`` with the new positions appended."""
    return CONSTANTS["kv_cache"]["present"].format(layer=layer, kind=kind)


def name_template(key: str) -> str:
    """A name template as the manifest publishes it, ``<param>`` standing for the parameter."""
    return _NAMES[key].format(p="<param>")


def lora_name(layer: int, target: str, which: str) -> str:
    """The adapter parameter ``which`` ("A" or "B") of LoRA ``target`` (a name of LORA_TARGETS) in ``layer``."""
    return CONSTANTS["lora"]["names"][which].format(layer=layer, target=target)
