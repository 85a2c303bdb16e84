"""Reliability of the JavaScript hosts (hosts/node, hosts/web).

- Output: the Node CLI writes nothing without --out, writes atomically (never through a
  planted symlink), and never into the artifact folder.
- ONNX external data: a model whose tensors point at other files (`../../etc/passwd`, an
  absolute path) is refused before any session opens it, by the Node host and by the page's
  shared check (hosts/web/lib.mjs checkSelfContained, run here under Node).
- serve.mjs: symlinks that lead out of their folder are 404; a non-loopback --host warns.
- Malformed manifests: one ArtifactError line and exit status 2, in Node and the page's checker.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from bench.hosts import start_serve
from tests.test_node_host import CLI, node_host  # noqa: F401 (node_host is a fixture)
from tests.test_web_host import NEEDED, STAMP, WEB, _npm_ci

ROOT = Path(__file__).resolve().parents[1]
LIB = WEB / "lib.mjs"
GPT2TRAIN = ROOT / "hosts" / "node" / "gpt2train.mjs"
SMALL = ["--steps", "1", "--batch", "1", "--seq", "8"]


def run_node(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(["node", str(CLI), *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd)


def run_script(source: str, *args) -> subprocess.CompletedProcess:
    """An ES module given as text, with argv[1:] = args."""
    return subprocess.run(["node", "--input-type=module", "-e", source, "--", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def expect_refusal(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit status 2 and exactly one `error: ...` line naming every needle; returns the line."""
    assert r.returncode == 2, f"expected exit status 2, got {r.returncode}:\n{r.stdout}\n{r.stderr}"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"want one 'error:' line, got:\n{r.stderr}"
    assert "    at " not in r.stderr and "TypeError" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """{relative name: sha256, '->target' or '/'} of everything in a folder (symlinks not followed)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        name = str(p.relative_to(folder))
        if p.is_symlink():
            out[name] = f"->{os.readlink(p)}"
        else:
            out[name] = "/" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def linked_copy(src: Path, dst: Path) -> Path:
    """An artifact folder whose files are symlinks to src's, and its own manifest.json."""
    dst.mkdir()
    for p in src.iterdir():
        if p.name == "manifest.json":
            shutil.copyfile(p, dst / p.name)
        else:
            (dst / p.name).symlink_to(p)
    return dst


# ------------------------------------------------------------------ output files (4b)
def test_no_out_writes_nothing(node_host, tiny_index, tmp_path):
    """Without --out the CLI used to write weights.safetensors into the working folder,
    replacing any file of that name."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "weights.safetensors").write_bytes(b"not the host's to replace")
    before = snapshot(work)
    r = run_node("--artifacts", tiny_index, "--steps", 5, "--batch", 1, "--seq", 8, cwd=work)
    assert r.returncode == 0, r.stderr
    assert snapshot(work) == before
    assert "not saved" in r.stdout and "--out" in r.stdout, r.stdout


def test_out_inside_the_artifact_folder_is_refused(node_host, tiny_index, tmp_path):
    art = linked_copy(tiny_index, tmp_path / "art")
    other = linked_copy(tiny_index, tmp_path / "other")  # any artifact folder, not only the one trained
    (other / "sub").mkdir()
    (tmp_path / "via-link").symlink_to(art, target_is_directory=True)
    before = {f: snapshot(f) for f in (art, other)}
    for out, folder in ((art / "trained.safetensors", art), (art / "weights.safetensors", art),
                        (tmp_path / "via-link" / "trained.safetensors", art), (other / "sub" / "w.safetensors", other)):
        r = run_node("--artifacts", art, *SMALL, "--out", out)
        expect_refusal(r, str(out), f"artifact folder {folder}")
        assert {f: snapshot(f) for f in (art, other)} == before, f"--out {out} changed an artifact folder"
        assert r.stdout == "", "refused before training"


def test_out_symlink_is_replaced_not_followed(node_host, tiny_index, tmp_path):
    from safetensors.numpy import load_file

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "w.safetensors"
    out.symlink_to(victim)
    r = run_node("--artifacts", tiny_index, *SMALL, "--out", out)
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "precious"
    assert not out.is_symlink() and out.is_file()
    assert sorted(load_file(str(out))) == sorted(load_file(str(tiny_index / "weights.safetensors")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt", "w.safetensors"]  # no temp file left


ATOMIC_SCRIPT = """
import { readdirSync, symlinkSync } from 'node:fs';
import path from 'node:path';
const { writeFileAtomic } = await import(process.argv[1]);
const [target, victim] = process.argv.slice(2);
// the temp name the host used to open with 'w' (following any symlink there)
symlinkSync(victim, path.join(path.dirname(target), `.${path.basename(target)}.${process.pid}.tmp`));
writeFileAtomic(target, Buffer.from('new weights'));
console.log(JSON.stringify(readdirSync(path.dirname(target)).sort()));
"""


def test_atomic_write_never_opens_an_existing_temp_name(node_host, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = folder / "w.safetensors"
    r = run_script(ATOMIC_SCRIPT, GPT2TRAIN, target, victim)
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "precious", "the write followed a planted symlink"
    assert target.read_bytes() == b"new weights"
    names = json.loads(r.stdout)
    assert "w.safetensors" in names and len(names) == 2, names  # the target and the planted link, no temp file
    link = next(folder.glob(".w.safetensors.*.tmp"))
    assert link.is_symlink() and Path(os.readlink(link)) == victim  # someone else's name: left alone


# ------------------------------------------------------------- ONNX external data (5)
def _external(tensor, location: str) -> None:
    """Move a TensorProto's data "out" to `location` (as onnx.external_data_helper records it)."""
    from onnx import TensorProto

    nbytes = len(tensor.raw_data) if tensor.HasField("raw_data") else 4
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(field)
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", "0"), ("length", str(nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _rehash(folder: Path, name: str) -> None:
    mpath = folder / "manifest.json"
    m = json.loads(mpath.read_text())
    data = (folder / name).read_bytes()
    m["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    mpath.write_text(json.dumps(m, indent=1))


def tamper_model(folder: Path, name: str, location: str, where: str = "initializer") -> str:
    """Give one tensor of folder/name external data at `location` (an initializer, or a
    Constant node's value), replace the file (not through a symlink) and rehash manifest.json.
    Returns the tensor's name."""
    import onnx

    path = folder / name
    model = onnx.load_from_string(path.read_bytes())
    if where == "initializer":
        tensor = model.graph.initializer[0]
        label = tensor.name
    else:
        node = next(n for n in model.graph.node if n.op_type == "Constant" and n.attribute[0].name == "value")
        tensor = node.attribute[0].t
        label = tensor.name
    _external(tensor, location)
    path.unlink(missing_ok=True)
    path.write_bytes(model.SerializeToString())
    _rehash(folder, name)
    return label


@pytest.mark.parametrize("model, where, location, flags", [
    ("train_step.onnx", "initializer", "../../../../etc/passwd", []),
    ("train_step.onnx", "initializer", "/etc/passwd", []),
    ("train_step.onnx", "constant", "inside-the-folder.bin", []),
    ("training_model.onnx", "initializer", "../../../../etc/passwd", ["--training-set"]),
])
def test_node_refuses_external_data(node_host, tiny_index, tmp_path, model, where, location, flags):
    art = linked_copy(tiny_index, tmp_path / "art")
    tamper_model(art, model, location, where)
    r = run_node("--artifacts", art, *SMALL, "--out", tmp_path / "w.safetensors", *flags)
    expect_refusal(r, str(art / model), json.dumps(location), "external")
    assert not (tmp_path / "w.safetensors").exists()


CHECK_SCRIPT = """
import { readFileSync } from 'node:fs';
const { checkSelfContained } = await import(process.argv[1]);
const out = [];
for (const file of process.argv.slice(2)) {
  try {
    checkSelfContained(new Uint8Array(readFileSync(file)), file);
    out.push(null);
  } catch (e) {
    out.push(`${e.constructor.name}: ${e.message}`);
  }
}
console.log(JSON.stringify(out));
"""


def _pb_varint(x: int) -> bytes:
    out = bytearray()
    while True:
        out.append((x & 0x7F) | (0x80 if x > 0x7F else 0))
        x >>= 7
        if not x:
            return bytes(out)


def _pb_field(field: int, payload: bytes) -> bytes:
    return _pb_varint(field << 3 | 2) + _pb_varint(len(payload)) + payload


def _synthetic_models(folder: Path) -> dict[str, tuple[Path, str | None]]:
    """name -> (file, expected path in the message, or None when the model must pass)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def ext_tensor(name):
        t = numpy_helper.from_array(np.zeros(2, np.float32), name)
        _external(t, "../../secret")
        return t

    def const_graph(name, tensor):
        return helper.make_graph([helper.make_node("Constant", [], ["y"], value=tensor)], name, [],
                                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])

    clean = numpy_helper.from_array(np.ones(2, np.float32), "c")
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [2])
    if_node = helper.make_node("If", ["cond"], ["out"], then_branch=const_graph("then", ext_tensor("deep")),
                               else_branch=const_graph("else", clean))
    models = {"subgraph": (helper.make_model(helper.make_graph([if_node], "g", [cond], [out])),
                           "model.graph.node.attribute.g.node.attribute.t")}

    sparse = helper.make_sparse_tensor(ext_tensor("sv"), numpy_helper.from_array(np.array([0, 1], np.int64), "si"), [4])
    g = helper.make_graph([helper.make_node("Identity", ["sv"], ["out"])], "g", [], [out])
    g.sparse_initializer.append(sparse)
    models["sparse"] = (helper.make_model(g), "model.graph.sparse_initializer.values")

    fn = helper.make_function("local", "f", [], ["y"], [helper.make_node("Constant", [], ["y"], value=ext_tensor("fc"))],
                              [helper.make_opsetid("", 20)])
    g = helper.make_graph([helper.make_node("f", [], ["out"], domain="local")], "g", [], [out])
    models["function"] = (helper.make_model(g, functions=[fn], opset_imports=[helper.make_opsetid("", 20),
                                                                            helper.make_opsetid("local", 1)]),
                          "model.functions.node.attribute.t")
    clean_if = helper.make_node("If", ["cond"], ["out"], then_branch=const_graph("then", clean),
                                else_branch=const_graph("else", clean))
    models["clean"] = (helper.make_model(helper.make_graph([clean_if], "g", [cond], [out])), None)

    files = {}
    for name, (m, where) in models.items():
        files[name] = (folder / f"{name}.onnx", where)
        files[name][0].write_bytes(m.SerializeToString())
    # Malformed bytes: a length past the end, and messages nested 450 deep (If inside If ...).
    files["truncated"] = (folder / "truncated.onnx", "not a well-formed ONNX model")
    files["truncated"][0].write_bytes(_pb_field(7, b"")[:1] + b"\xff\xff\xff\xff\x0f")
    nested = b""
    for _ in range(150):
        nested = _pb_field(1, _pb_field(5, _pb_field(6, nested)))  # graph.node.attribute.g
    files["nested"] = (folder / "nested.onnx", "deeper than 100")
    files["nested"][0].write_bytes(_pb_field(7, nested))
    assert onnx.load_from_string(files["clean"][0].read_bytes()).graph.node[0].op_type == "If"
    return files


def test_page_check_refuses_external_data(tiny_index, tmp_path):
    """hosts/web/lib.mjs checkSelfContained, which the page (app.mjs) and hosts/node run on
    every model before a session: the real models pass; each place a tensor can hide external
    data is found; malformed or deeply nested bytes are refused, not crashed on."""
    art = linked_copy(tiny_index, tmp_path / "art")
    tamper_model(art, "forward.onnx", "/etc/passwd", "constant")  # the page's sampling model
    tamper_model(art, "train_step.onnx", "../../../../etc/passwd")
    clean = [tiny_index / f"{n}.onnx" for n in ("train_step", "forward", "training_model", "eval_model", "optimizer_model")]
    synthetic = _synthetic_models(tmp_path)
    files = [*clean, art / "forward.onnx", art / "train_step.onnx", *(f for f, _ in synthetic.values())]
    r = run_script(CHECK_SCRIPT, LIB, *files)
    assert r.returncode == 0, r.stderr
    got = dict(zip(files, json.loads(r.stdout)))
    for f in clean:
        assert got[f] is None, got[f]
    for f, location, where in ((art / "forward.onnx", "/etc/passwd", "model.graph.node.attribute.t"),
                               (art / "train_step.onnx", "../../../../etc/passwd", "model.graph.initializer")):
        assert got[f] and got[f].startswith(f"Error: {f}: tensor "), got[f]
        assert f"({where})" in got[f] and json.dumps(location) in got[f], got[f]
    for name, (f, needle) in synthetic.items():
        if needle is None:
            assert got[f] is None, f"{name}: {got[f]}"
        else:
            assert got[f] and got[f].startswith(f"Error: {f}: ") and needle in got[f], f"{name}: {got[f]}"


# ------------------------------------------------------------------------ serve.mjs (6)
@pytest.fixture(scope="module")
def web_modules() -> Path:
    """hosts/web/node_modules (onnxruntime-web, which serve.mjs serves at /ort/)."""
    lock_path = Path(tempfile.gettempdir()) / f"gpt2-onnx-web-npm-{hashlib.sha1(str(WEB).encode()).hexdigest()[:12]}.lock"
    with open(lock_path, "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # the same lock as tests/test_web_host.py
        fresh = STAMP.is_file() and STAMP.stat().st_mtime >= (WEB / "package-lock.json").stat().st_mtime
        if not fresh or not all((WEB / p).is_file() for p in NEEDED):
            _npm_ci()
    return WEB


class Serve:
    def __init__(self, *args: str):
        self.proc, self.url = start_serve("node", list(args))
        if self.url is None:
            _, err = self.stop()
            raise AssertionError(f"serve.mjs printed no URL\n{err}")

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url.rstrip("/") + path, timeout=10) as res:
                return res.status, res.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def stop(self) -> tuple[str, str]:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.communicate()


def test_serve_refuses_symlinks_out_of_their_folder(web_modules, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "also-secret.txt").write_text("top secret too")
    served, data = tmp_path / "served", tmp_path / "data"
    tiny = served / "tiny"
    tiny.mkdir(parents=True)
    data.mkdir()
    (tiny / "manifest.json").write_text('{"format": "x"}')
    (tiny / "leak.txt").symlink_to(secret)  # a file symlink out of the artifact folder
    (tiny / "leakdir").symlink_to(outside, target_is_directory=True)  # a folder symlink out of it
    (tiny / "alias.json").symlink_to(tiny / "manifest.json")  # a symlink that stays inside: fine
    os.mkfifo(tiny / "fifo")  # not a regular file (and reading it would block)
    elsewhere = tmp_path / "elsewhere"  # an artifact folder linked in, as tests/test_web_host.py does
    elsewhere.mkdir()
    (elsewhere / "manifest.json").write_text('{"format": "y"}')
    (elsewhere / "leak.txt").symlink_to(secret)
    (served / "linked").symlink_to(elsewhere, target_is_directory=True)
    (served / "etc").symlink_to(outside, target_is_directory=True)  # linked in, but no artifact folder
    (data / "ok.json").write_text("{}")
    (data / "leak.txt").symlink_to(secret)

    server = Serve("--artifacts", str(served), "--data", str(data))
    try:
        got = {p: server.get(p) for p in (
            "/artifacts/tiny/manifest.json", "/artifacts/tiny/alias.json", "/artifacts/linked/manifest.json", "/data/ok.json",
            "/artifacts/tiny/leak.txt", "/artifacts/tiny/leakdir/also-secret.txt", "/artifacts/tiny/fifo",
            "/artifacts/linked/leak.txt", "/artifacts/etc/also-secret.txt", "/data/leak.txt", "/index.html")}
    finally:
        server.stop()
    assert got["/artifacts/tiny/manifest.json"] == (200, b'{"format": "x"}')
    assert got["/artifacts/tiny/alias.json"] == (200, b'{"format": "x"}')
    assert got["/artifacts/linked/manifest.json"] == (200, b'{"format": "y"}')
    assert got["/data/ok.json"] == (200, b"{}")
    assert got["/index.html"][0] == 200
    for p in ("/artifacts/tiny/leak.txt", "/artifacts/tiny/leakdir/also-secret.txt", "/artifacts/tiny/fifo",
              "/artifacts/linked/leak.txt", "/artifacts/etc/also-secret.txt", "/data/leak.txt"):
        status, body = got[p]
        assert status == 404 and b"top secret" not in body, f"{p}: HTTP {status} {body[:60]!r}"


@pytest.mark.parametrize("host, warns", [
    ("0.0.0.0", True), ("127.0.0.1", False), ("127.0.0.2", False), ("localhost", False), ("::1", False),
])
def test_serve_warns_on_a_non_loopback_host(web_modules, tmp_path, host, warns):
    if host == "::1" and not Path("/proc/net/if_inet6").exists():
        pytest.skip("no IPv6 on this machine")
    try:
        server = Serve("--artifacts", str(tmp_path), "--host", host)
    except AssertionError as e:
        if host == "::1" and "cannot listen" in str(e):
            pytest.skip(f"cannot listen on ::1 here: {e}")
        raise
    _, err = server.stop()
    if warns:
        assert "warning" in err and f"--host {host} is not a loopback address" in err and str(tmp_path.resolve()) in err, err
    else:
        assert "warning" not in err, err


# ---------------------------------------------------------------- manifests (14)
_DELETE = object()


def _set(path: str, value):
    """An edit that sets (or, with _DELETE, removes) the dotted key path of a manifest."""
    def edit(m):
        *head, last = path.split(".")
        node = m
        for k in head:
            node = node[int(k)] if isinstance(node, list) else node[k]
        if isinstance(node, list):
            node[int(last)] = value
        elif value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return edit


def _dup_param(m):
    m["parameters"].append(copy.deepcopy(m["parameters"][2]))


def _edit_models(m):
    m["models"]["train_step.onnx"] = {"inputs": {}, "outputs": []}


def _rename_file(old, new):
    def edit(m):
        m["files"][new] = m["files"].pop(old)
    return edit


MALFORMED = [  # (id, edit, text the one error line must hold)
    ("manifest-a-list", lambda m: [m], "not a gpt2-onnx-artifacts manifest"),
    ("format", _set("format", "other"), 'format="other"'),
    ("format_version-retired", _set("format_version", 1), "format_version 1 is retired"),
    ("format_version-string", _set("format_version", "2"), 'format_version "2"'),
    ("parameters-not-a-list", lambda m: m.update(parameters={p["name"]: p for p in m["parameters"]}), '"parameters" is'),
    ("config-a-string", _set("config", "tiny"), '"config" is "tiny"'),
    ("config-null", _set("config", None), '"config" is null'),
    ("files-a-list", _set("files", []), '"files" is [] (a list)'),
    ("models-missing", _set("models", _DELETE), 'missing key "models"'),
    ("hp-a-list", _set("hp", [1, 2]), '"hp" is [1,2]'),
    ("config-lacks-d_ff", _set("config.d_ff", _DELETE), "config lacks d_ff"),
    ("vocab-0", _set("config.vocab", 0), "config.vocab = 0, expected an integer >= 1"),
    ("vocab-string", _set("config.vocab", "256"), 'config.vocab = "256"'),
    ("n_heads-bool", _set("config.n_heads", True), "config.n_heads = true"),
    ("context-float", _set("config.context", 64.5), "config.context = 64.5"),
    ("labels", _set("config.labels", "onehot"), 'config.labels = "onehot"'),
    ("beta1-string", _set("config.beta1", "0.9"), 'config.beta1 = "0.9"'),
    ("eps-0", _set("config.eps", 0), "config.eps = 0"),
    ("hp-layout", lambda m: m["hp"]["layout"].reverse(), "hp is"),
    ("hp-length", _set("hp.length", 8), 'hp is "float32"[8]'),
    ("hp-dtype", _set("hp.dtype", "float16"), 'hp is "float16"[7]'),
    ("param-a-string", _set("parameters.0", "wte"), 'parameters[0] = "wte" is not'),
    ("param-shape-0", _set("parameters.0.shape", [0, 64]), "parameters[0] ="),
    ("param-shape-string", _set("parameters.1.shape", "64x64"), "parameters[1] ="),
    ("param-dtype", _set("parameters.2.dtype", "float16"), "parameters[2] ="),
    ("param-no-name", _set("parameters.3.name", _DELETE), "parameters[3] ="),
    ("param-duplicate", _dup_param, "is listed twice"),
    ("no-parameters", _set("parameters", []), "lists no parameters"),
    ("wte-vs-config", _set("parameters.0.shape", [128, 64]), "parameter wte has shape [128,64], which means vocab=128"),
    ("file-no-sha256", _set("files.checkpoint.sha256", _DELETE), 'files["checkpoint"] ='),
    ("file-bytes-string", _set("files.checkpoint.bytes", "484512"), 'files["checkpoint"] ='),
    ("file-dotdot", _rename_file("checkpoint", "../x"), '"../x", which is outside the artifact folder'),
    ("file-absolute", _rename_file("checkpoint", "/etc/passwd"), '"/etc/passwd", which is outside'),
    ("model-io", _edit_models, 'models["train_step.onnx"].inputs = {}'),
]


def _malformed(base: dict, edit) -> object:
    m = copy.deepcopy(base)
    out = edit(m)
    return m if out is None else out


@pytest.fixture(scope="module")
def malformed_folders(tiny_index, tmp_path_factory) -> dict[str, Path]:
    """One artifact folder per MALFORMED row: tiny's files (symlinked) and the broken manifest."""
    base = json.loads((tiny_index / "manifest.json").read_text())
    root = tmp_path_factory.mktemp("manifests")
    out = {}
    for name, edit, _ in MALFORMED:
        folder = linked_copy(tiny_index, root / name)
        (folder / "manifest.json").write_text(json.dumps(_malformed(base, edit)))
        out[name] = folder
    return out


@pytest.mark.parametrize("name, needle", [(n, s) for n, _, s in MALFORMED], ids=[n for n, _, _ in MALFORMED])
def test_node_refuses_malformed_manifest(node_host, malformed_folders, tmp_path, name, needle):
    folder = malformed_folders[name]
    r = run_node("--artifacts", folder, *SMALL, "--out", tmp_path / "w.safetensors")
    expect_refusal(r, str(folder / "manifest.json"), needle)
    assert r.stdout == "" and not (tmp_path / "w.safetensors").exists()


PAGE_MANIFEST_SCRIPT = """
import { readFileSync } from 'node:fs';
const { readManifest } = await import(process.argv[1]);
const out = [];
for (const file of process.argv.slice(2)) {
  try {
    readManifest(JSON.parse(readFileSync(file, 'utf8')), file);
    out.push(null);
  } catch (e) {
    out.push(`${e.constructor.name}: ${e.message}`);
  }
}
console.log(JSON.stringify(out));
"""


def test_page_refuses_malformed_manifests(malformed_folders, tiny_index):
    """The page's readManifest is the same checker (hosts/web/lib.mjs checkManifest)."""
    files = [tiny_index / "manifest.json", *(malformed_folders[n] / "manifest.json" for n, _, _ in MALFORMED)]
    r = run_script(PAGE_MANIFEST_SCRIPT, LIB, *files)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got[0] is None, got[0]
    for (name, _, needle), msg in zip(MALFORMED, got[1:]):
        assert msg is not None and msg.startswith("Error: ") and needle in msg, f"{name}: {msg}"
