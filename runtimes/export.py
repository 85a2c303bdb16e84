"""``python -m runtimes export --hf DIR``: weights of this project as a Hugging Face GPT-2 folder.

The weights come from a checkpoint (``--checkpoint``; its artifact folder is
the one it records, or ``--artifacts``), from an artifact folder's initial
weights (``--artifacts`` alone), or from a weights file such as a run's
``weights.safetensors`` (``--weights`` with ``--artifacts``). DIR receives:

- ``config.json``: GPT-2 with this project's shape and math (tanh GELU,
  LayerNorm epsilon 1e-5, tied output layer);
- ``model.safetensors``: Hugging Face's names and Conv1D layout, c_attn fused,
  ``lm_head.weight`` left out as Hugging Face saves tied weights
  (contract/hf_layout.py);
- ``generation_config.json``;
- ``tokenizer.json`` when the artifact folder has a Hugging Face tokenizer (a
  byte folder has none to give: token ids are UTF-8 bytes);
- ``gpt2-onnx-export.json``, which marks the folder as an export and lists its
  files, so that a later export may replace it.

``transformers.GPT2LMHeadModel.from_pretrained(DIR)`` then computes this
project's logits.

``--onnx DIR`` instead writes the folder transformers.js
(``@huggingface/transformers`` v3) loads from disk for its text-generation
pipeline: ``config.json``, ``generation_config.json``, ``tokenizer.json`` with
``tokenizer_config.json``, and ``onnx/model.onnx``: the artifact folder's
decoder.onnx with the weights baked in as initializers and the inputs and
outputs renamed to the ones transformers.js feeds a GPT-2 decoder
(``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.<l>.key/value`` -> ``logits``, ``present.<l>.key/value``).
``attention_mask`` is accepted and not read: the decoder's causal mask is all
there is, so only unpadded sequences (one prompt, or prompts of one length) are
generated correctly. A byte folder gets a byte-level ``tokenizer.json`` whose
ids 0..255 are the raw bytes, so the prompt encodes to the ids this project's
sampler feeds.

From a LoRA folder (its checkpoint, initial weights or weights file: the
adapters), ``--hf`` and ``--onnx`` write the merged model, ``W + B A alpha/rank``
(contract/lora.py), and ``--peft DIR`` writes the adapters alone as PEFT saves
them: ``adapter_config.json`` and ``adapter_model.safetensors``, which
``peft.PeftModel.from_pretrained(base, DIR)`` loads onto the base model (the
``--hf`` export of the folder's initial weights, or the Hugging Face folder it
was built from).

Every DIR is written in a temporary sibling and swapped in; it must
be new, empty, or an earlier export (contract/outfolder.py), and never inside an
artifact folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from contract import BASE_FILE, HF_EXPORT_FORMAT, HF_EXPORT_MARKER
from contract.files import refuse_artifact_folder, sha256_file
from contract.hf_layout import to_hf
from contract.outfolder import FolderKind, check_out_folder, make_temp_sibling, swap_in

from .artifacts import Artifacts, check_weights, load_artifacts
from .checkpoint import check_base, load_checkpoint
from .errors import ArtifactError, CheckpointError, InputError, OutputError
from .tokenizer import load_tokenizer

EXPORT_FOLDER = FolderKind(marker=HF_EXPORT_MARKER, format=HF_EXPORT_FORMAT, noun="an earlier export",
                           option="--hf", verb="write")
ONNX_EXPORT_FOLDER = FolderKind(marker=HF_EXPORT_MARKER, format=HF_EXPORT_FORMAT, noun="an earlier export",
                                option="--onnx", verb="write")
PEFT_EXPORT_FOLDER = FolderKind(marker=HF_EXPORT_MARKER, format=HF_EXPORT_FORMAT, noun="an earlier export",
                                option="--peft", verb="write")
END_OF_TEXT = "<|endoftext|>"
DECODER = "decoder.onnx"
TJS_MODEL = "onnx/model.onnx"  # transformers.js's file for a decoder-only model at dtype fp32
PROTOBUF_LIMIT = 2**31 - 2**24  # an ONNX file with its weights inside must stay under 2 GiB; some room for the graph


def _weights_file(path: Path, art: Artifacts) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    if not path.is_file():
        raise InputError(f"--weights {path} does not exist")
    try:
        weights = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise InputError(f"--weights {path} is not a readable safetensors file: {' '.join(str(e).split())}") from None
    check_weights(weights, art, f"--weights {path}", error=InputError)
    return weights


def source_weights(checkpoint=None, artifacts=None, weights=None) -> tuple[Artifacts, dict[str, np.ndarray], dict]:
    """(artifact folder, parameters in manifest order, a description of where they came from)."""
    if checkpoint is not None and weights is not None:
        raise InputError("give --checkpoint or --weights, not both")
    if checkpoint is not None:
        ckpt = load_checkpoint(checkpoint)
        art = load_artifacts(artifacts or ckpt.artifacts)
        check_base(ckpt, art, str(checkpoint))
        if ckpt.fingerprint != art.fingerprint:
            raise CheckpointError(
                f"{checkpoint} was written for another model (fingerprint {ckpt.fingerprint}) than the artifacts in "
                f"{art.folder} ({art.fingerprint})"
            )
        check_weights(ckpt.params, art, str(checkpoint), error=CheckpointError)
        params, origin = ckpt.params, {"checkpoint": str(Path(checkpoint).resolve()), "step": ckpt.step}
    elif weights is not None:
        if artifacts is None:
            raise InputError("--weights needs --artifacts: the artifact folder the weights belong to")
        art = load_artifacts(artifacts)
        params, origin = _weights_file(Path(weights), art), {"weights": str(Path(weights).resolve())}
    elif artifacts is not None:
        art = load_artifacts(artifacts)
        params, origin = art.initial_weights(), {"initial_weights": True}
    else:
        raise InputError("give what to export: --checkpoint CKPT, --artifacts ART, or --weights FILE --artifacts ART")
    for name in art.param_names:
        if not np.isfinite(params[name]).all():
            raise InputError(f"parameter {name!r} holds NaN or infinite values; it cannot be exported")
    origin["artifacts"] = str(art.folder.resolve())
    return art, {n: params[n] for n in art.param_names}, origin


def hf_config(cfg: dict, bos: int | None, eos: int | None) -> dict:
    """config.json of GPT2LMHeadModel computing this project's model."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg["vocab"],
        "n_positions": cfg["context"],
        "n_embd": cfg["d_model"],
        "n_layer": cfg["n_layers"],
        "n_head": cfg["n_heads"],
        "n_inner": None if cfg["d_ff"] == 4 * cfg["d_model"] else cfg["d_ff"],  # null: 4 n_embd, as GPT-2's own
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-05,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "dtype": "float32",
    }


def _prepare(out, flag: str, folder_kind, force: bool, checkpoint, artifacts, weights):
    """What both exports check and read first: the output folder may be written (never inside an
    artifact folder, never a user's folder), then the weights and the folder's tokenizer.
    Returns (out, art, the model's weights (a LoRA folder's merged), origin, tokenizer,
    end-of-text id: GPT-2's bos and eos, or None)."""
    out = Path(os.path.abspath(out))
    refuse_artifact_folder(out, flag)
    check_out_folder(out, folder_kind, force)
    art, params, origin = source_weights(checkpoint, artifacts, weights)
    if art.lora is not None:
        params = art.merged(params)
        origin["merged_lora"] = {k: art.lora[k] for k in ("rank", "alpha", "targets")}
    tok = load_tokenizer(art)
    end = None if tok.kind == "bytes" else tok.token_to_id(END_OF_TEXT)
    return out, art, params, origin, tok, end



@contextlib.contextmanager
def _export_folder(out: Path, kind):
    """A temporary sibling of ``out`` to write an export into (``_seal`` swaps it in). An
    OSError becomes an OutputError saying ``out`` is as it was; the sibling never stays."""
    tmp = make_temp_sibling(out, kind)
    try:
        yield tmp
    except OSError as e:
        raise OutputError(f"could not write the export {out}: {e.strerror or e}; {out} is as it was") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _seal(tmp: Path, out: Path, kind, force: bool, **marker) -> None:
    """Write the export marker ({format, **marker}), make every file world-readable, swap ``tmp`` in."""
    (tmp / HF_EXPORT_MARKER).write_text(json.dumps({"format": HF_EXPORT_FORMAT, **marker}, indent=1) + "\n")
    for f in tmp.rglob("*"):
        if f.is_file():
            f.chmod(0o644)
    swap_in(tmp, out, kind, force)


def export_hf(out: str | Path, checkpoint=None, artifacts=None, weights=None, force: bool = False,
              log=print) -> dict:
    """Write the Hugging Face folder ``out``; returns {file name: sha256} of what was written."""
    out, art, params, origin, tok, end = _prepare(out, "--hf", EXPORT_FOLDER, force, checkpoint, artifacts, weights)
    from safetensors.numpy import save_file

    with _export_folder(out, EXPORT_FOLDER) as tmp:
        save_file(to_hf(params, art.config), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(art.config, end, end), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(
            json.dumps({"_from_model_config": True, "bos_token_id": end, "eos_token_id": end}, indent=2) + "\n")
        if tok.kind != "bytes":
            shutil.copyfile(tok.path, tmp / "tokenizer.json")
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        _seal(tmp, out, EXPORT_FOLDER, force, files=files, **{"from": origin})
    log(f"wrote {out}: {', '.join(sorted(files))} ({sum(p.size for p in params.values()):,} parameters"
        + (f", from step {origin['step']})" if "step" in origin else ")"))
    if tok.kind == "bytes":
        log(f"no tokenizer written: {art.folder} is byte-level (token ids are the UTF-8 bytes of the text), "
            f"which no Hugging Face tokenizer file describes")
    return files


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of a byte-level tokenizer.json."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def byte_tokenizer_json() -> str:
    """tokenizer.json whose id of every byte is the byte itself: a BPE without merges over
    GPT-2's byte alphabet, no regex split, so any text encodes to its UTF-8 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def transformersjs_model(art: Artifacts, params: dict[str, np.ndarray]):
    """decoder.onnx as transformers.js runs a GPT-2: weights as initializers, its input and output names."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from contract import KV_KINDS, past_name, present_name

    path = art.path(DECODER)
    if not path.is_file():
        raise ArtifactError(f"{art.folder} has no {DECODER}; rebuild the artifacts (python -m graphgen build)")
    size = sum(p.nbytes for p in params.values())
    if size > PROTOBUF_LIMIT:
        raise InputError(f"the weights take {size:,} bytes; onnx/model.onnx holds them inside and cannot exceed 2 GiB")
    model = onnx.load(str(path))
    g = model.graph
    rename = {"tokens": "input_ids", "positions": "position_ids"}
    for layer in range(art.config["n_layers"]):
        for kind in KV_KINDS:
            rename[past_name(layer, kind)] = f"past_key_values.{layer}.{kind}"
            rename[present_name(layer, kind)] = f"present.{layer}.{kind}"
    for node in g.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
    for v in (*g.input, *g.output, *g.value_info):
        v.name = rename.get(v.name, v.name)
    names = set(art.model_param_names)
    inputs = [v for v in g.input if v.name not in names]
    # transformers.js always feeds it; the total length is the past's plus the new tokens'
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "past+seq"])
    del g.input[:]
    g.input.extend([inputs[0], mask, *inputs[1:]])
    g.initializer.extend(numpy_helper.from_array(np.ascontiguousarray(params[n], np.float32), n)
                         for n in art.model_param_names)
    return model


def tokenizer_config(tok_kind: str, context: int) -> dict:
    """tokenizer_config.json: GPT-2's class; decoded text left as the tokenizer gives it."""
    special = {} if tok_kind == "bytes" else {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT,
                                              "unk_token": END_OF_TEXT}
    return {"tokenizer_class": "GPT2Tokenizer", "model_max_length": context, "add_prefix_space": False,
            "clean_up_tokenization_spaces": False, **special}


def export_onnx(out: str | Path, checkpoint=None, artifacts=None, weights=None, force: bool = False,
                log=print) -> dict:
    """Write the transformers.js folder ``out``; returns {name: sha256, "onnx": {name: sha256}}."""
    import onnx

    out, art, params, origin, tok, end = _prepare(out, "--onnx", ONNX_EXPORT_FOLDER, force, checkpoint, artifacts,
                                                  weights)
    model = transformersjs_model(art, params)
    with _export_folder(out, ONNX_EXPORT_FOLDER) as tmp:
        config = hf_config(art.config, end, end)
        config["use_cache"] = True
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(
            json.dumps({"bos_token_id": end, "eos_token_id": end}, indent=2) + "\n")
        if tok.kind == "bytes":
            (tmp / "tokenizer.json").write_text(byte_tokenizer_json())
        else:
            shutil.copyfile(tok.path, tmp / "tokenizer.json")
        (tmp / "tokenizer_config.json").write_text(
            json.dumps(tokenizer_config(tok.kind, art.config["context"]), indent=2) + "\n")
        (tmp / "onnx").mkdir(mode=0o755)
        onnx.save(model, str(tmp / TJS_MODEL))
        files: dict = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        files["onnx"] = {p.name: sha256_file(p) for p in sorted((tmp / "onnx").iterdir())}
        _seal(tmp, out, ONNX_EXPORT_FOLDER, force, files=files, **{"from": origin})
    log(f"wrote {out}: {', '.join(sorted(n for n in files if n != 'onnx'))}, {TJS_MODEL} "
        f"({sum(p.size for p in params.values()):,} parameters"
        + (f", from step {origin['step']})" if "step" in origin else ")"))
    if tok.kind == "bytes":
        log(f"tokenizer.json is byte-level: {art.folder} reads UTF-8 bytes, token id = byte")
    return files


def export_peft(out: str | Path, checkpoint=None, artifacts=None, weights=None, force: bool = False,
                log=print) -> dict:
    """Write a LoRA folder's adapters as PEFT's ``out`` (adapter_config.json, adapter_model.safetensors);
    returns {file name: sha256}. InputError for a folder without adapters."""
    from safetensors.numpy import save_file

    from contract.lora import peft_config, to_peft

    out = Path(os.path.abspath(out))
    refuse_artifact_folder(out, "--peft")
    check_out_folder(out, PEFT_EXPORT_FOLDER, force)
    art, params, origin = source_weights(checkpoint, artifacts, weights)
    if art.lora is None:
        raise InputError(f"--peft: {art.folder} is not a LoRA folder (it trains every weight; build one with "
                         f"--lora-rank); export it with --hf instead")
    source = art.manifest.get("source") or {}
    with _export_folder(out, PEFT_EXPORT_FOLDER) as tmp:
        save_file(to_peft(params, art.config, art.lora), str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        config = peft_config(art.lora, source.get("path") if isinstance(source.get("path"), str) else None)
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        _seal(tmp, out, PEFT_EXPORT_FOLDER, force, files=files, **{"from": origin},
              base={"file": str(art.path(BASE_FILE).resolve()), "sha256": art.manifest["frozen"]["sha256"]})
    log(f"wrote {out}: {', '.join(sorted(files))} ({sum(p.size for p in params.values()):,} adapter parameters, "
        f"rank {art.lora['rank']} on {','.join(art.lora['targets'])}"
        + (f", from step {origin['step']})" if "step" in origin else ")"))
    return files


def main(args) -> int:
    """The ``export`` subcommand; exit status 2 with one line for every bad input."""
    import sys

    from .errors import GPT2OnnxError

    targets = [t for t in (args.hf, args.onnx, getattr(args, "peft", None)) if t]
    if len(targets) != 1:
        print("error: give one of --hf DIR (transformers), --onnx DIR (transformers.js) or --peft DIR (a LoRA "
              "folder's adapters for PEFT): the folder to write", file=sys.stderr)
        return 2
    export = export_hf if args.hf else export_onnx if args.onnx else export_peft
    try:
        export(targets[0], checkpoint=args.checkpoint, artifacts=args.artifacts, weights=args.weights,
               force=args.force)
    except GPT2OnnxError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    return 0
