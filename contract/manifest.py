"""manifest.json: its format and version, its structure, and what it says about a folder.

Readers check a manifest before opening anything it names: the format and a
version they read (retired versions get the reason and a request to rebuild),
then the structure (manifest.schema.json, plus what a schema cannot express:
wte/wpe shapes against the config, unique parameter names, file names inside
the folder). Every failure is an ArtifactError naming the manifest and the value.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from . import (BASE_FILE, BYTES_VOCAB_SIZE, CONFIG_KEYS, CONFIG_SIZES, FROZEN_MANIFEST_VERSION, HP_LAYOUT, LABEL_MODES,
               LORA_TARGETS, MANIFEST_FORMAT, MANIFEST_VERSION, RETIRED_VERSIONS, SCHEMA, SOURCE_KINDS, TOKENIZER_FILE,
               TOKENIZER_KINDS)
from .errors import ArtifactError
from .jsonlimits import loads_limited

MAX_MANIFEST_BYTES = 64 << 20


def read_manifest(mpath: Path) -> dict:
    """Parse ``mpath`` within bounds and check its format and version (ArtifactError otherwise)."""
    try:
        size = mpath.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise ArtifactError(f"{mpath} is {size:,} bytes; a manifest is a few hundred KiB at most")
        manifest = loads_limited(mpath.read_bytes(), str(mpath), ArtifactError)
    except OSError as e:
        raise ArtifactError(f"{mpath} cannot be read: {e.strerror or e}") from None
    check_format(mpath, manifest)
    return manifest


def check_format(mpath, manifest) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ArtifactError(f"{mpath}: not a {MANIFEST_FORMAT} manifest (format={found!r})")
    version = manifest.get("format_version")
    if version in RETIRED_VERSIONS:
        raise ArtifactError(
            f"{mpath}: format_version {version} is retired: {RETIRED_VERSIONS[version]}; rebuild the artifacts "
            f"(python -m graphgen build, or make artifacts); checkpoints resume on the rebuilt folder"
        )
    if version not in (MANIFEST_VERSION, FROZEN_MANIFEST_VERSION) or isinstance(version, bool):
        raise ArtifactError(
            f"{mpath}: format_version {version!r} is not one this runner reads {(MANIFEST_VERSION, FROZEN_MANIFEST_VERSION)}; "
            f"rebuild the artifacts with this version"
        )


def _check_schema(mpath, manifest: dict) -> None:
    import jsonschema

    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(SCHEMA).iter_errors(manifest))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ArtifactError(
            f"{mpath}: {where}: {error.message}; the manifest is damaged or from another version (rebuild the artifacts)"
        )


def _is_param_entry(p) -> bool:
    """A parameters or frozen.parameters entry: {name: str, shape: [positive ints], dtype: "float32"}."""
    return (isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("shape"), list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in p["shape"])
            and p.get("dtype") == "float32")


def check_structure(mpath, manifest: dict) -> None:
    """Structure and internal consistency: what every runner relies on before opening a model.

    The hand-written checks come first for their messages, which name the value
    and what was expected; the schema then catches whatever they do not cover.
    """

    def bad(what: str):
        raise ArtifactError(f"{mpath}: {what}; the manifest is damaged or from another version (rebuild the artifacts)")

    for key, kind in (("config", dict), ("parameters", list), ("files", dict), ("models", dict), ("hp", dict)):
        if key not in manifest:
            bad(f"missing key {key!r}")
        if not isinstance(manifest[key], kind):
            bad(f"{key!r} is a {type(manifest[key]).__name__}, expected a {kind.__name__}")
    cfg = manifest["config"]
    missing_cfg = [k for k in CONFIG_KEYS if k not in cfg]
    if missing_cfg:
        raise ArtifactError(f"{mpath}: config lacks {missing_cfg}")
    for k in CONFIG_SIZES:
        if isinstance(cfg[k], bool) or not isinstance(cfg[k], int) or cfg[k] < 1:
            bad(f"config.{k} = {cfg[k]!r}, expected an integer >= 1")
    if cfg["labels"] not in LABEL_MODES:
        bad(f"config.labels = {cfg['labels']!r}, expected 'index' or 'dense'")
    for k, ok, rng in (("beta1", lambda v: 0 <= v < 1, "in [0, 1)"), ("beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
                       ("eps", lambda v: v > 0, "> 0"), ("weight_decay", lambda v: v >= 0, ">= 0"),
                       ("clip", lambda v: v >= 0, ">= 0")):
        v = cfg.get(k, 0.5 if k.startswith("beta") else 1.0)  # optional: only the training set reads them
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
            bad(f"config.{k} = {v!r}, expected a finite number {rng}")
    hp = manifest["hp"]
    if list(hp.get("layout", ())) != list(HP_LAYOUT) or hp.get("length") != len(HP_LAYOUT) or hp.get("dtype") != "float32":
        bad(f"hp is {hp.get('dtype')!r}[{hp.get('length')!r}] {hp.get('layout')!r}, this runner feeds float32[7] {list(HP_LAYOUT)}")
    names = set()
    for i, p in enumerate(manifest["parameters"]):
        if not _is_param_entry(p):
            bad(f"parameters[{i}] = {p!r} is not {{name, shape: [positive ints], dtype: 'float32'}}")
        if p["name"] in names:
            bad(f"parameter {p['name']!r} is listed twice")
        names.add(p["name"])
    if not names:
        bad("lists no parameters")
    shapes = {p["name"]: p["shape"] for p in manifest["parameters"]}
    for name, want in (("wte", [cfg["vocab"], cfg["d_model"]]), ("wpe", [cfg["context"], cfg["d_model"]])):
        if name in shapes and shapes[name] != want:
            raise ArtifactError(
                f"{mpath}: parameter {name!r} has shape {shapes[name]}, but config (vocab {cfg['vocab']}, "
                f"context {cfg['context']}, d_model {cfg['d_model']}) implies {want}: the manifest is from another config"
            )
    for name, info in manifest["files"].items():
        if (not isinstance(info, dict) or not isinstance(info.get("sha256"), str)
                or isinstance(info.get("bytes"), bool) or not isinstance(info.get("bytes"), int)):
            bad(f"files[{name!r}] = {info!r} is not {{sha256, bytes}}")
        if Path(name).is_absolute() or ".." in Path(name).parts:
            bad(f"files lists {name!r}, which is outside the artifact folder")
    _check_tokenizer(manifest, bad)
    _check_source(manifest, bad)
    _check_frozen(manifest, names, bad)
    _check_schema(mpath, manifest)


def tokenizer_of(manifest: dict) -> dict:
    """The manifest's tokenizer entry; folders that record none are byte-level."""
    return manifest.get("tokenizer") or {"kind": "bytes", "vocab_size": BYTES_VOCAB_SIZE}


def _check_tokenizer(manifest: dict, bad) -> None:
    if "tokenizer" not in manifest:
        return
    tok = manifest["tokenizer"]
    if not isinstance(tok, dict) or tok.get("kind") not in TOKENIZER_KINDS:
        bad(f"tokenizer = {tok!r}, expected an object whose kind is one of {list(TOKENIZER_KINDS)}")
    size = tok.get("vocab_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        bad(f"tokenizer.vocab_size = {size!r}, expected an integer >= 1")
    if tok["kind"] == "bytes":
        if size != BYTES_VOCAB_SIZE:
            bad(f"tokenizer.vocab_size = {size!r}, but a bytes tokenizer has {BYTES_VOCAB_SIZE}")
        return
    vocab = manifest["config"]["vocab"]
    if size > vocab:
        bad(f"tokenizer.vocab_size = {size} is larger than config.vocab = {vocab}: its ids would not fit the model")
    if tok.get("file") != TOKENIZER_FILE:
        bad(f"tokenizer.file = {tok.get('file')!r}, expected {TOKENIZER_FILE!r}")
    listed = manifest["files"].get(TOKENIZER_FILE)
    if not isinstance(listed, dict) or listed.get("sha256") != tok.get("sha256"):
        bad(f"tokenizer.sha256 = {tok.get('sha256')!r} is not the sha256 files lists for {TOKENIZER_FILE!r}")


def _check_source(manifest: dict, bad) -> None:
    if "source" not in manifest:
        return
    src = manifest["source"]
    if not isinstance(src, dict) or src.get("kind") not in SOURCE_KINDS:
        bad(f"source = {src!r}, expected an object whose kind is one of {list(SOURCE_KINDS)}")
    if src["kind"] == "huggingface" and not isinstance(src.get("files"), dict):
        bad(f"source.files = {src.get('files')!r}, expected an object of file name -> sha256")


def _check_frozen(manifest: dict, names: set, bad) -> None:
    """format_version 4 and ``frozen`` + ``lora`` go together (a LoRA folder); 3 has neither."""
    version, frozen, lora = manifest["format_version"], manifest.get("frozen"), manifest.get("lora")
    if version != FROZEN_MANIFEST_VERSION:
        if frozen is not None or lora is not None:
            bad(f"format_version {version} lists frozen inputs or lora; a folder with them is format_version "
                f"{FROZEN_MANIFEST_VERSION}")
        return
    if not isinstance(frozen, dict) or not isinstance(lora, dict):
        bad(f"format_version {version} (frozen inputs) needs the objects 'frozen' and 'lora', got "
            f"frozen={type(frozen).__name__}, lora={type(lora).__name__}")
    if frozen.get("file") != BASE_FILE:
        bad(f"frozen.file = {frozen.get('file')!r}, expected {BASE_FILE!r}")
    listed = manifest["files"].get(BASE_FILE)
    if not isinstance(listed, dict) or listed.get("sha256") != frozen.get("sha256"):
        bad(f"frozen.sha256 = {frozen.get('sha256')!r} is not the sha256 files lists for {BASE_FILE!r}")
    params = frozen.get("parameters")
    if not isinstance(params, list) or not params:
        bad(f"frozen.parameters = {params!r}, expected a non-empty list of {{name, shape, dtype}}")
    for i, p in enumerate(params):
        if not _is_param_entry(p):
            bad(f"frozen.parameters[{i}] = {p!r} is not {{name, shape: [positive ints], dtype: 'float32'}}")
        if p["name"] in names:
            bad(f"{p['name']!r} is both a parameter and a frozen input")
    targets = lora.get("targets")
    if not isinstance(targets, list) or not targets or any(t not in LORA_TARGETS for t in targets):
        bad(f"lora.targets = {targets!r}, expected a non-empty list of {list(LORA_TARGETS)}")
    for k in ("rank", "alpha", "scale"):
        v = lora.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            bad(f"lora.{k} = {v!r}, expected a finite number > 0")


def frozen_of(manifest: dict) -> list[dict]:
    """The manifest's frozen inputs ({name, shape, dtype}), empty for a folder that trains every parameter."""
    return list((manifest.get("frozen") or {}).get("parameters", []))


def artifact_folder_holding(path: str | Path) -> Path | None:
    """The artifact folder that ``path`` is, or lies inside, or None.

    Runners never write into an artifact folder: a file added there is refused by
    the next build, and one replaced (weights.safetensors) makes the folder fail
    its hash check for good. A folder is one when its manifest.json says so.
    """
    p = Path(os.path.abspath(path))
    for folder in (p, *p.parents):
        mpath = folder / "manifest.json"
        try:
            if not mpath.is_file() or mpath.stat().st_size > 64 << 20:
                continue
            manifest = loads_limited(mpath.read_bytes(), str(mpath), ValueError)
        except (OSError, ValueError):
            continue
        if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT:
            return folder
    return None


_DTYPES = {1: "float32", 7: "int64", 9: "bool", 11: "float64"}  # onnx TensorProto data types


def describe_io(model) -> dict:
    """A model's graph inputs (initializers excluded) and outputs as the manifest records them:
    ``{"inputs": [{name, dtype, shape}], "outputs": [...]}``, a dim being its symbol, size or None."""

    def value(vi) -> dict:
        t = vi.type
        if not t.HasField("tensor_type"):
            return {"name": vi.name, "dtype": "sequence" if t.HasField("sequence_type") else "other", "shape": None}
        tt = t.tensor_type
        shape = None
        if tt.HasField("shape"):
            shape = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else None)
                     for d in tt.shape.dim]
        return {"name": vi.name, "dtype": _DTYPES.get(tt.elem_type, str(tt.elem_type)), "shape": shape}

    inits = {i.name for i in model.graph.initializer}
    return {"inputs": [value(i) for i in model.graph.input if i.name not in inits],
            "outputs": [value(o) for o in model.graph.output]}
