"""Reading an artifact folder: the manifest, its checks, and the initial weights.

Runners depend on this file and on manifest.json, never on the builder's code.
Loading verifies, before anything runs, that the manifest is ours and of a
version we read, that every file it lists is there, and that each file's
sha256 matches: a truncated copy or a file from another build is an
ArtifactError that names the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from .errors import ArtifactError
from .jsonlimits import loads_limited

MANIFEST_FORMAT = "gpt2-onnx-artifacts"
SUPPORTED_VERSIONS = (3,)
RETIRED_VERSIONS = {
    1: "its train_step.onnx computes wrong embedding gradients on onnxruntime with 2+ threads "
       "(ScatterND add races on repeated tokens)",
    2: "its train_step.onnx has no gradient-clipping input (clip) or grad_norm output",
}
CONFIG_KEYS = ("vocab", "context", "d_model", "n_heads", "d_ff", "n_layers", "seed", "init", "labels")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Artifacts:
    folder: Path
    manifest: dict

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def param_names(self) -> list[str]:
        return [p["name"] for p in self.manifest["parameters"]]

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {p["name"]: tuple(p["shape"]) for p in self.manifest["parameters"]}

    @property
    def label_mode(self) -> str:
        return self.config["labels"]

    def path(self, name: str) -> Path:
        if name not in self.manifest["files"]:
            raise ArtifactError(f"{self.folder}: manifest.json lists no file {name!r} (artifacts from another version?)")
        return self.folder / name

    def model_io(self, model: str) -> dict:
        try:
            return self.manifest["models"][model]
        except KeyError:
            raise ArtifactError(f"{self.folder}: manifest.json describes no model {model!r}") from None

    @cached_property
    def fingerprint(self) -> str:
        """Identifies the model these artifacts train: config and parameter layout.

        The training set's clipping threshold is left out: it decides how the
        optimizer treats gradients, not which model the parameters belong to, so a
        checkpoint resumes on a folder rebuilt with another threshold."""
        config = {k: v for k, v in self.config.items() if k != "clip"}
        key = json.dumps([config, self.manifest["parameters"]], sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def initial_weights(self) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        weights = load_file(str(self.path("weights.safetensors")))
        check_weights(weights, self, "weights.safetensors")
        return {n: weights[n] for n in self.param_names}


def check_weights(weights: dict[str, np.ndarray], art: Artifacts, source: str, error: type = ArtifactError) -> None:
    """Every parameter present with the manifest's shape and float32 dtype (raises ``error``)."""
    shapes = art.param_shapes
    missing = [n for n in shapes if n not in weights]
    if missing:
        raise error(f"{source}: missing parameters {missing[:5]}{'...' if len(missing) > 5 else ''}")
    for name, shape in shapes.items():
        w = weights[name]
        if tuple(w.shape) != shape or w.dtype != np.float32:
            raise error(
                f"{source}: parameter {name!r} is {w.dtype}{list(w.shape)}, manifest says float32{list(shape)}"
            )


def _header_shapes(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} from a safetensors file's JSON header, without reading the data."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= 100 << 20:
                raise ValueError(f"header length {n}")
            header = loads_limited(f.read(n), "its header", ValueError, max_bytes=100 << 20)
        return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ArtifactError(f"{path}: not a readable safetensors file ({e})") from None


def _check_manifest(mpath: Path, manifest: dict) -> None:
    """Structure and internal consistency: what every runner relies on before opening a model."""
    from .hp import HP_LAYOUT

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
    for k in ("vocab", "context", "d_model", "n_heads", "d_ff", "n_layers"):
        if isinstance(cfg[k], bool) or not isinstance(cfg[k], int) or cfg[k] < 1:
            bad(f"config.{k} = {cfg[k]!r}, expected an integer >= 1")
    if cfg["labels"] not in ("index", "dense"):
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
        if (not isinstance(p, dict) or not isinstance(p.get("name"), str) or not isinstance(p.get("shape"), list)
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in p["shape"])
                or p.get("dtype") != "float32"):
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


def _external_tensors(graph, where: str):
    """(where, location) of every tensor in ``graph`` and its subgraphs stored as external data."""
    def tensors():
        yield from graph.initializer
        for sp in graph.sparse_initializer:
            yield sp.values
            yield sp.indices
        for node in graph.node:
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                if a.HasField("sparse_tensor"):
                    yield a.sparse_tensor.values
                    yield a.sparse_tensor.indices
                for sp in a.sparse_tensors:
                    yield sp.values
                    yield sp.indices

    for t in tensors():
        if t.data_location == 1 or len(t.external_data):  # TensorProto.EXTERNAL
            location = next((e.value for e in t.external_data if e.key == "location"), "?")
            yield f"{where}: tensor {t.name!r}", location
    for node in graph.node:
        for a in node.attribute:
            subgraphs = ([a.g] if a.HasField("g") else []) + list(a.graphs)
            for sub in subgraphs:
                yield from _external_tensors(sub, f"{where} (subgraph of node {node.name!r})")


def check_models(art: "Artifacts") -> None:
    """Each model the manifest lists is self-contained and has the inputs and outputs it records.

    No model of this project stores data outside its .onnx file, so any external
    data is refused (onnxruntime 1.19 would follow a location such as
    ``../../etc/passwd`` or an absolute path and train on that file's bytes).
    The inputs and outputs (names, dtypes, ranks) must be the manifest's, and a
    ``labels`` input must have the dtype the config's label mode implies, so a
    model swapped in from another build fails here and not at the first step.
    Runs before any session is created.
    """
    import onnx

    labels_dtype = {"index": "int64", "dense": "float32"}[art.config["labels"]]
    for name, recorded in art.manifest["models"].items():
        path = art.path(name)
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # protobuf's DecodeError and friends
            raise ArtifactError(f"{path} is not a readable ONNX model: {e}") from None
        for where, location in _external_tensors(model.graph, str(path)):
            raise ArtifactError(
                f"{where} stores its data outside the model (external data at {location!r}); "
                f"this project's models are self-contained, so the folder is refused"
            )
        actual = describe_io(model)
        if not isinstance(recorded, dict):
            raise ArtifactError(f"{art.folder}/manifest.json: models[{name!r}] is not an object")
        for side in ("inputs", "outputs"):
            want = recorded.get(side)
            got = [(v["name"], v["dtype"], None if v["shape"] is None else len(v["shape"])) for v in actual[side]]
            try:
                expected = [(v["name"], v["dtype"], None if v["shape"] is None else len(v["shape"])) for v in want]
            except (TypeError, KeyError):
                raise ArtifactError(f"{art.folder}/manifest.json: models[{name!r}].{side} is malformed") from None
            if got != expected:
                diff = next((f"{g} vs {e}" for g, e in zip(got, expected) if g != e), f"{len(got)} vs {len(expected)} {side}")
                raise ArtifactError(
                    f"{path}: its {side} (name, dtype, rank) differ from manifest.json ({diff}): "
                    f"the model is from another build; rebuild the artifacts"
                )
        for v in actual["inputs"]:
            if v["name"] == "labels" and v["dtype"] != labels_dtype:
                raise ArtifactError(
                    f"{path}: input 'labels' is {v['dtype']}, but config.labels is {art.config['labels']!r} "
                    f"({labels_dtype}): the model is from another build; rebuild the artifacts"
                )


def load_artifacts(folder: str | Path, verify: bool = True, needs: tuple[str, ...] = ()) -> Artifacts:
    """Read and check ``folder/manifest.json``; ``needs`` lists files the caller will open.

    Always (cheap): the manifest's format, version, structure and internal
    consistency, the presence of every file ``needs`` names, and that the
    parameter names, shapes and dtypes in weights.safetensors' header are the
    manifest's. With ``verify`` (the default): every file the manifest lists
    exists with its recorded size and sha256.
    """
    folder = Path(folder)
    mpath = folder / "manifest.json"
    if not folder.is_dir():
        raise ArtifactError(f"artifact folder {folder} does not exist (build it with: python -m graphgen build --out {folder})")
    if not mpath.is_file():
        raise ArtifactError(f"{folder} has no manifest.json; is it an artifact folder? (python -m graphgen build --out {folder})")
    try:
        if mpath.stat().st_size > 64 << 20:
            raise ArtifactError(f"{mpath} is {mpath.stat().st_size:,} bytes; a manifest is a few hundred KiB at most")
        manifest = loads_limited(mpath.read_bytes(), str(mpath), ArtifactError)
    except OSError as e:
        raise ArtifactError(f"{mpath} cannot be read: {e.strerror or e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ArtifactError(f"{mpath}: not a {MANIFEST_FORMAT} manifest (format={manifest.get('format') if isinstance(manifest, dict) else None!r})")
    version = manifest.get("format_version")
    if version in RETIRED_VERSIONS:
        raise ArtifactError(
            f"{mpath}: format_version {version} is retired: {RETIRED_VERSIONS[version]}; rebuild the artifacts "
            f"(python -m graphgen build, or make artifacts); checkpoints resume on the rebuilt folder"
        )
    if version not in SUPPORTED_VERSIONS:
        raise ArtifactError(
            f"{mpath}: format_version {version!r} is not one this runner reads {SUPPORTED_VERSIONS}; rebuild the artifacts with this version"
        )
    _check_manifest(mpath, manifest)
    art = Artifacts(folder, manifest)
    for name in needs:
        if not art.path(name).is_file():
            raise ArtifactError(f"{folder}: file {name} listed in manifest.json is missing")
    if verify:
        for name, info in manifest["files"].items():
            path = folder / name
            if not path.is_file():
                raise ArtifactError(f"{folder}: file {name} listed in manifest.json is missing")
            if path.stat().st_size != info["bytes"]:
                raise ArtifactError(
                    f"{path}: {path.stat().st_size} bytes, manifest.json says {info['bytes']} (truncated or replaced?)"
                )
            if sha256_file(path) != info["sha256"]:
                raise ArtifactError(f"{path}: sha256 differs from manifest.json (corrupted or from another build)")
    wpath = folder / "weights.safetensors"
    if "weights.safetensors" in manifest["files"] and wpath.is_file():
        header = _header_shapes(wpath)
        for name, shape in art.param_shapes.items():
            got = header.get(name)
            if got is None:
                raise ArtifactError(f"{wpath}: has no parameter {name!r}, which manifest.json lists (manifest from another config?)")
            if got != ("F32", shape):
                raise ArtifactError(
                    f"{wpath}: parameter {name!r} is {got[0]}{list(got[1])}, manifest.json says F32{list(shape)} "
                    f"(manifest from another config?)"
                )
    return art
