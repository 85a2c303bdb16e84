"""The contract has one owner: contract/constants.json and contract/manifest.schema.json.

Python (contract/) and JavaScript (hosts/common/) read those files and are held
to the same vectors (contract/vectors/); no source outside contract/ writes a
contract constant out again.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest

import contract
from contract.errors import ArtifactError, InputError
from contract.hp import make_hp
from contract.manifest import check_format, check_structure

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "contract" / "vectors"


def load(name: str) -> dict:
    return json.loads((VECTORS / name).read_text())


# --------------------------------------------------------------------------- hp
@pytest.mark.parametrize("case", load("hp.json")["cases"], ids=lambda c: f"t={c['step']}")
def test_make_hp_vectors(case):
    hp = make_hp(case["lr"], case["beta1"], case["beta2"], case["eps"], case["weight_decay"], step=case["step"])
    assert hp.view(np.uint32).tolist() == case["hp_bits"]


@pytest.mark.parametrize("case", load("hp.json")["errors"], ids=lambda c: c["error_names"])
def test_make_hp_error_vectors(case):
    with pytest.raises(InputError, match=case["error_names"]):
        make_hp(case["lr"], case["beta1"], case["beta2"], case["eps"], case["weight_decay"], step=case["step"])


# --------------------------------------------------------------------------- samplers
def test_sampler_vectors():
    from tests.test_web_host import mulberry32

    doc = load("samplers.json")
    for case in doc["mulberry32"]:
        r = mulberry32(case["seed"])
        assert [r() for _ in case["first"]] == case["first"]
    for case in doc["byte_sampler"]:
        rand, high = mulberry32(case["seed"]), case["text_bytes"] - case["seq"]
        assert [[int(rand() * high) for _ in range(case["batch"])] for _ in case["offsets"]] == case["offsets"]


# --------------------------------------------------------------------------- manifests
def edited(base: dict, edit) -> dict:
    m = copy.deepcopy(base)
    if edit is None:
        return m
    op, path, *value = edit
    target = m
    for key in path[:-1]:
        target = target[key]
    if op == "delete":
        del target[path[-1]]
    else:
        target[path[-1]] = value[0]
    return m


@pytest.mark.parametrize("case", load("manifests.json")["cases"], ids=lambda c: c["name"])
def test_manifest_vectors(case):
    m = edited(load("manifest_base.json"), case["edit"])
    if case["error"] is None:
        check_format("manifest.json", m)
        check_structure("manifest.json", m)
        return
    with pytest.raises(ArtifactError) as e:
        check_format("manifest.json", m)
        check_structure("manifest.json", m)
    assert case["error"] in str(e.value)


def test_manifest_base_is_what_the_builder_writes(tmp_path):
    """The vectors' base manifest keeps up with the builder (everything but hashes, tools and time)."""
    from graphgen.artifacts import build_artifacts
    from graphgen.config import GPT2Config

    built = build_artifacts(GPT2Config.preset("tiny", n_layers=1), tmp_path / "a", log=lambda m: None)
    base = load("manifest_base.json")
    for key in set(built) | set(base):
        if key not in ("files", "tools", "created_unix", "name", "models"):
            assert built.get(key) == base.get(key), f"contract/vectors/manifest_base.json: {key} is stale"
    assert set(built["files"]) == set(base["files"]) and set(built["models"]) == set(base["models"])
    # onnxruntime-training numbers some optimizer-model names with a process-wide counter: the
    # models this project spells are compared whole
    for model in ("train_step.onnx", "forward.onnx", "decoder.onnx", "eval_model.onnx"):
        assert built["models"][model] == base["models"][model], f"manifest_base.json: models[{model!r}] is stale"


def test_schema_accepts_what_the_builder_writes(tiny_index):
    import jsonschema

    jsonschema.Draft202012Validator(contract.SCHEMA).validate(json.loads((tiny_index / "manifest.json").read_text()))


# --------------------------------------------------------------------------- one owner
SOURCES = [p for d in ("graphgen", "runtimes", "bench", "hosts") for p in (ROOT / d).rglob("*")
           if p.suffix in (".py", ".mjs", ".js", ".html") and "node_modules" not in p.parts]


def _literals() -> list[tuple[str, str]]:
    c = contract.CONSTANTS
    out = [("format name", c["format"]), ("hp notes", c["hp"]["notes"])]
    out += [(f"retired version {k}", v[:40]) for k, v in c["retired_versions"].items()]
    return out


# The hp layout written out as a list: "lr", "beta1", "beta2", ...
LAYOUT = re.compile(r"""["']lr["'],\s*["']beta1["'],\s*["']beta2["']""")


# A name template written out: "new.m." + p, f"new.{p}", `m.${name}`, 'v.' + n ...
TEMPLATE = re.compile(r"""["'`](new\.(m\.|v\.)?|m\.|v\.)(["'`]|\{|\$\{)""")


def test_no_contract_constant_is_written_outside_the_contract():
    found = []
    for path in SOURCES:
        text = path.read_text(errors="replace")
        for what, literal in _literals():
            if literal in text:
                found.append(f"{path.relative_to(ROOT)}: {what} {literal!r}")
        if LAYOUT.search(text):
            found.append(f"{path.relative_to(ROOT)}: the hp layout written out")
        for m in TEMPLATE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            found.append(f"{path.relative_to(ROOT)}:{line}: name template {m.group(0)!r}")
    assert not found, "contract constants written outside contract/:\n" + "\n".join(found)


def test_graphgen_does_not_import_runtimes():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "graphgen").glob("*.py")
                 if re.search(r"^\s*(from|import) runtimes\b", p.read_text(), re.M)]
    assert not offenders, offenders


def test_contract_depends_on_neither_side():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "contract").glob("*.py")
                 if re.search(r"^\s*(from|import) (runtimes|graphgen)\b", p.read_text(), re.M)]
    assert not offenders, offenders
