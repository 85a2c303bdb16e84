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
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from contract import MANIFEST_FORMAT, TRAINING_FILES  # noqa: F401  (MANIFEST_FORMAT: re-exported for callers)
from contract.files import sha256_file  # noqa: F401
from contract.jsonlimits import loads_limited
from contract.manifest import artifact_folder_holding, check_structure, describe_io, read_manifest  # noqa: F401
from contract import BASE_FILE
from contract.manifest import frozen_of, tokenizer_of

from .errors import ArtifactError


SPLIT_STEP_FILES = ("grad_step.onnx", "apply_step.onnx")  # gradient accumulation and data parallel


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
    def frozen_shapes(self) -> dict[str, tuple[int, ...]]:
        """A LoRA folder's frozen inputs (the base weights), name -> shape; empty otherwise."""
        return {p["name"]: tuple(p["shape"]) for p in frozen_of(self.manifest)}

    @property
    def lora(self) -> dict | None:
        """The manifest's ``lora`` entry (rank, alpha, scale, targets), None for a folder without adapters."""
        return self.manifest.get("lora")

    @property
    def base_ref(self) -> dict | None:
        """What a LoRA checkpoint records of the base it trained on: base.safetensors' path and sha256."""
        if self.lora is None:
            return None
        return {"path": str((self.folder / BASE_FILE).resolve()), "sha256": self.manifest["frozen"]["sha256"]}

    @property
    def param_counts(self) -> tuple[int, int]:
        """(trained, total) numbers of weights: a LoRA folder trains its adapters, its base is frozen."""
        trained = sum(int(np.prod(s)) for s in self.param_shapes.values())
        return trained, trained + sum(int(np.prod(s)) for s in self.frozen_shapes.values())

    @property
    def model_param_names(self) -> list[str]:
        """The GPT-2 weights' names (decoder.onnx's inputs, what exports write): a LoRA folder's frozen
        inputs, else its parameters."""
        return list(self.frozen_shapes) or self.param_names

    def merged(self, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model's weights for ``params``: a LoRA folder's base with the adapters merged in
        (W + B A alpha/rank, contract/lora.py), else ``params`` themselves; in model_param_names order."""
        if self.lora is None:
            return {n: params[n] for n in self.param_names}
        from contract.lora import merge

        return merge(self.frozen_weights(), params, self.config, self.lora)

    def frozen_weights(self) -> dict[str, np.ndarray]:
        """The frozen inputs' values (base.safetensors), checked against the manifest; {} without any."""
        shapes = self.frozen_shapes
        if not shapes:
            return {}
        from safetensors.numpy import load_file

        weights = load_file(str(self.path(BASE_FILE)))
        check_weights(weights, self, BASE_FILE, shapes=shapes)
        return {n: weights[n] for n in shapes}

    @property
    def label_mode(self) -> str:
        return self.config["labels"]

    @property
    def tokenizer(self) -> dict:
        """The manifest's tokenizer entry (``{"kind": "bytes", ...}`` where it records none)."""
        return tokenizer_of(self.manifest)

    def path(self, name: str) -> Path:
        if name not in self.manifest["files"] and name in SPLIT_STEP_FILES:
            raise ArtifactError(
                f"{self.folder} predates the split step graphs ({name}) that --accumulate and --data-parallel run: "
                f"rebuild it (python -m graphgen build --config NAME --out NEW_FOLDER, or --from-hf as before)")
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
        checkpoint resumes on a folder rebuilt with another threshold. A tokenizer
        other than bytes is part of the model (an id means what it says), so it is
        in; byte folders keep the fingerprint they had before tokenizers were recorded.
        So are a LoRA folder's rank, alpha and targets (alpha scales what the adapters
        mean); its base is checked apart, by sha256 (checkpoint.check_base)."""
        config = {k: v for k, v in self.config.items() if k != "clip"}
        parts = [config, self.manifest["parameters"]]
        if self.tokenizer["kind"] != "bytes":
            parts.append(self.tokenizer["sha256"])
        if self.lora is not None:
            parts.append({k: self.lora[k] for k in ("rank", "alpha", "targets")})
        key = json.dumps(parts, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def initial_weights(self) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        weights = load_file(str(self.path("weights.safetensors")))
        check_weights(weights, self, "weights.safetensors")
        return {n: weights[n] for n in self.param_names}


def check_weights(weights: dict[str, np.ndarray], art: Artifacts, source: str, error: type = ArtifactError,
                  shapes: dict | None = None) -> None:
    """Every parameter (or every name of ``shapes``) present with the manifest's shape and float32
    dtype (raises ``error``)."""
    shapes = art.param_shapes if shapes is None else shapes
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


def check_models(art: "Artifacts", only: tuple[str, ...] | None = None) -> None:
    """Each model the manifest lists is self-contained and has the inputs and outputs it records.

    No model of this project stores data outside its .onnx file, so any external
    data is refused (onnxruntime 1.19 would follow a location such as
    ``../../etc/passwd`` or an absolute path and train on that file's bytes).
    The inputs and outputs (names, dtypes, ranks) must be the manifest's, and a
    ``labels`` input must have the dtype the config's label mode implies, so a
    model swapped in from another build fails here and not at the first step.
    Runs before any session is created. ``only``: check just these models (a
    caller that opens one model need not parse the others, hundreds of MB on gpt2).
    """
    import onnx

    labels_dtype = {"index": "int64", "dense": "float32"}[art.config["labels"]]
    for name, recorded in art.manifest["models"].items():
        if only is not None and name not in only:
            continue
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
    manifest = read_manifest(mpath)
    check_structure(mpath, manifest)
    art = Artifacts(folder, manifest)
    missing_set = [n for n in needs if n in TRAINING_FILES and n not in manifest["files"]]
    if missing_set:
        raise ArtifactError(
            f"{folder} was built without ONNX Runtime's training set ({', '.join(missing_set)}): "
            "onnxruntime-training was not installed where it was built. Rebuild it where it is "
            "(pip install '.[training]'), or use --runtime ort"
        )
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
