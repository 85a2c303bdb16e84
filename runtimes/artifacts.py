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

from .errors import ArtifactError

MANIFEST_FORMAT = "gpt2-onnx-artifacts"
SUPPORTED_VERSIONS = (1,)
CONFIG_KEYS = ("vocab", "context", "d_model", "n_heads", "d_ff", "n_layers", "seed", "init", "labels")


def _sha256(path: Path) -> str:
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
            raise ArtifactError(f"{self.folder}: manifest.json lists no file {name!r}")
        return self.folder / name

    def model_io(self, model: str) -> dict:
        try:
            return self.manifest["models"][model]
        except KeyError:
            raise ArtifactError(f"{self.folder}: manifest.json describes no model {model!r}") from None

    @cached_property
    def fingerprint(self) -> str:
        """Identifies the model these artifacts train: config and parameter layout."""
        key = json.dumps([self.config, self.manifest["parameters"]], sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def initial_weights(self) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        weights = load_file(str(self.path("weights.safetensors")))
        check_weights(weights, self, "weights.safetensors")
        return {n: weights[n] for n in self.param_names}


def check_weights(weights: dict[str, np.ndarray], art: Artifacts, source: str) -> None:
    """Every parameter present with the manifest's shape and float32 dtype."""
    shapes = art.param_shapes
    missing = [n for n in shapes if n not in weights]
    if missing:
        raise ArtifactError(f"{source}: missing parameters {missing[:5]}{'...' if len(missing) > 5 else ''}")
    for name, shape in shapes.items():
        w = weights[name]
        if tuple(w.shape) != shape or w.dtype != np.float32:
            raise ArtifactError(
                f"{source}: parameter {name!r} is {w.dtype}{list(w.shape)}, manifest says float32{list(shape)}"
            )


def load_artifacts(folder: str | Path, verify: bool = True, needs: tuple[str, ...] = ()) -> Artifacts:
    """Read and check ``folder/manifest.json``; ``needs`` lists files the caller will open."""
    folder = Path(folder)
    mpath = folder / "manifest.json"
    if not folder.is_dir():
        raise ArtifactError(f"artifact folder {folder} does not exist (build it with: python -m graphgen build --out {folder})")
    if not mpath.is_file():
        raise ArtifactError(f"{folder} has no manifest.json; is it an artifact folder? (python -m graphgen build --out {folder})")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ArtifactError(f"{mpath}: not a {MANIFEST_FORMAT} manifest (format={manifest.get('format') if isinstance(manifest, dict) else None!r})")
    version = manifest.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise ArtifactError(
            f"{mpath}: format_version {version!r} is not one this runner reads {SUPPORTED_VERSIONS}; rebuild the artifacts with this version"
        )
    for key in ("config", "parameters", "files", "models", "hp"):
        if key not in manifest:
            raise ArtifactError(f"{mpath}: missing key {key!r}")
    missing_cfg = [k for k in CONFIG_KEYS if k not in manifest["config"]]
    if missing_cfg:
        raise ArtifactError(f"{mpath}: config lacks {missing_cfg}")
    art = Artifacts(folder, manifest)
    for name in needs:
        art.path(name)
    if verify:
        for name, info in manifest["files"].items():
            path = folder / name
            if not path.is_file():
                raise ArtifactError(f"{folder}: file {name} listed in manifest.json is missing")
            if path.stat().st_size != info["bytes"]:
                raise ArtifactError(
                    f"{path}: {path.stat().st_size} bytes, manifest.json says {info['bytes']} (truncated or replaced?)"
                )
            if _sha256(path) != info["sha256"]:
                raise ArtifactError(f"{path}: sha256 differs from manifest.json (corrupted or from another build)")
    return art
