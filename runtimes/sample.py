"""Text generation with decoder.onnx's key/value cache: ``python -m runtimes sample``.

The prompt runs once through decoder.onnx (the prefill, empty cache); each
further call feeds only the newest token and its position and appends one
position to every layer's cache, so a step costs the weights once plus
attention over the tokens so far, where re-running forward.onnx on the whole
sequence costs every position again. The session is a plain onnxruntime
``InferenceSession`` with IO binding: the parameters are uploaded once as
OrtValues, and each call's ``present.*`` OrtValues are bound as the next call's
``past.*`` as they are, never copied to NumPy.

Choosing a token from the last position's logits (:func:`pick`), in this order:
temperature 0 is greedy (argmax, the lowest id on a tie); otherwise the logits
are divided by the temperature (in float64), top-k keeps the k largest (ties
with the k-th kept; 0: off), top-p keeps the most probable tokens whose
probabilities reach p together (the token that crosses p included; 1: off), and
one id is drawn from the renormalised probabilities with
``numpy.random.default_rng(seed).choice``.

The model reads at most ``context`` positions (wpe has no row beyond), and a key
cache cannot slide: shifting the window changes every cached position. So
generation stops when the sequence fills the context: the last token produced
is the one predicted from ``context`` tokens, after which nothing more can be
fed. The CLI says so on stderr.
"""

from __future__ import annotations

import codecs
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contract import BASE_FILE, KV_KINDS, LOGITS_OUTPUT, past_name, present_name

from .artifacts import Artifacts, check_models, check_weights, load_artifacts, sha256_file
from .checkpoint import check_base
from .errors import ArtifactError, CheckpointError, InputError
from .ort_env import import_onnxruntime

DECODER = "decoder.onnx"


# --------------------------------------------------------------------------- tokenizer
class _ByteStream:
    """Streaming byte-token decoder: UTF-8 split across tokens is held until complete;
    invalid UTF-8, and ids that are not bytes, become U+FFFD."""

    def __init__(self):
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        if 0 <= token < 256:
            return self._utf8.decode(bytes((token,)))
        return self._utf8.decode(b"", final=True) + "\ufffd"

    def end(self) -> str:
        """What is held back at the end (an incomplete UTF-8 sequence: U+FFFD)."""
        return self._utf8.decode(b"", final=True)


def _byte_encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def _byte_decode(ids: Sequence[int]) -> str:
    s = _ByteStream()
    return "".join(s.push(int(i)) for i in ids) + s.end()


@dataclass(frozen=True)
class Tokenizer:
    kind: str
    encode: Callable[[str], list[int]]  # text -> token ids
    decode: Callable[[Sequence[int]], str]  # token ids -> text
    stream: Callable[[], _ByteStream]  # a fresh streaming decoder: .push(id) -> text so far, .end() -> the rest


BYTES = Tokenizer("bytes", _byte_encode, _byte_decode, _ByteStream)


def tokenizer_for(art: Artifacts) -> Tokenizer:
    """The tokenizer an artifact folder's manifest names (``tokenizer``: {"kind": ...});
    byte-level when it names none."""
    spec = art.manifest.get("tokenizer")
    kind = spec.get("kind") if isinstance(spec, dict) else spec
    if spec is None or kind == "bytes":
        return BYTES
    if kind == "huggingface":
        from .tokenizer import load_tokenizer

        tok = load_tokenizer(art)
        return Tokenizer("huggingface", lambda text: [int(i) for i in tok.encode(text)], tok.decode,
                         lambda: _DecodeStream(tok.decode))
    raise ArtifactError(f"{art.folder}: manifest.json names tokenizer kind {kind!r}; this sampler reads 'bytes' "
                        f"and 'huggingface'")


class _DecodeStream:
    """Streaming decode for a BPE tokenizer: the ids so far are decoded whole and the new
    suffix emitted, held back while it ends in U+FFFD (a byte-level token that splits a
    UTF-8 character)."""

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode, self._ids, self._done = decode, [], 0

    def push(self, token: int) -> str:
        self._ids.append(int(token))
        text = self._decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        out, self._done = text[self._done:], len(text)
        return out

    def end(self) -> str:
        return self._decode(self._ids)[self._done:]


# --------------------------------------------------------------------------- token choice
def pick(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    """One token id from a (vocab,) row of logits (rules in the module docstring)."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = np.asarray(logits, np.float64) / temperature  # (V,)
    if 0 < top_k < z.size:
        kth = np.partition(z, z.size - top_k)[z.size - top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")  # most probable first, lower id first on ties
        before = np.cumsum(p[order]) - p[order]  # probability of the tokens ranked above each
        p[order[before >= top_p]] = 0.0
        p /= p.sum()
    return int(rng.choice(p.size, p=p))


def check_options(temperature: float, top_k: int, top_p: float, max_new_tokens: int) -> None:
    if not temperature >= 0 or not np.isfinite(temperature):
        raise InputError(f"--temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if top_k < 0:
        raise InputError(f"--top-k must be >= 0 (0: off), got {top_k}")
    if not 0 < top_p <= 1:
        raise InputError(f"--top-p must be in (0, 1] (1: off), got {top_p}")
    if max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")


# --------------------------------------------------------------------------- the cached decoder
def session_options(threads: int | None):
    """runtimes/ort.py's options (denormals flushed, all graph optimisations, sequential)
    without its shared arena that grows by what is requested: that suits a train step's
    fixed shapes, but every decode step asks for caches one position longer, and with it
    the 1000th token of a run on small took 5 ms instead of 1."""
    from .ort import session_options as ort_options

    return ort_options(threads, shared_arena=False)


class Decoder:
    """decoder.onnx in one session: parameters bound once, the cache kept as OrtValues.

    ``decoder(tokens)`` feeds int64 (B, T_new) token ids at the positions that
    follow the cache and returns the last position's logits, float32 (B, vocab);
    ``reset()`` empties the cache."""

    def __init__(self, art: Artifacts, params: dict[str, np.ndarray], threads: int | None = None):
        ort = import_onnxruntime()
        cfg = art.config
        self.context, self.vocab = cfg["context"], cfg["vocab"]
        self._heads, self._d_head = cfg["n_heads"], cfg["d_model"] // cfg["n_heads"]
        self._cache_names = [(past_name(l, k), present_name(l, k)) for l in range(cfg["n_layers"]) for k in KV_KINDS]
        want = ["tokens", "positions", *art.model_param_names, *(p for p, _ in self._cache_names)]
        got = [v["name"] for v in art.model_io(DECODER)["inputs"]]
        if got != want:
            raise ArtifactError(f"{art.folder}/{DECODER}: inputs {got[:4]}... are not this sampler's "
                                f"(tokens, positions, parameters, past.<layer>.key/value); rebuild the artifacts")
        self._ort = ort
        self._sess = ort.InferenceSession(str(art.path(DECODER)), session_options(threads),
                                          providers=["CPUExecutionProvider"])
        self._binding = self._sess.io_binding()
        self._params = {}  # bound once, for every call
        for n in art.model_param_names:
            value = ort.OrtValue.ortvalue_from_shape_and_type(list(params[n].shape), np.float32, "cpu", 0)
            value.update_inplace(np.ascontiguousarray(params[n], dtype=np.float32))  # a copy, not an alias
            self._binding.bind_ortvalue_input(n, value)
            self._params[n] = value
        self.batch = 0
        self.length = 0  # positions in the cache
        self._cache: list = []

    def reset(self, batch: int = 1) -> None:
        empty = np.zeros((batch, self._heads, 0, self._d_head), np.float32)  # (B, H, 0, dh)
        self._cache = [self._ort.OrtValue.ortvalue_from_numpy(empty) for _ in self._cache_names]
        self.batch, self.length = batch, 0

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)  # (B, T_new)
        b, t = tokens.shape
        if not self._cache or b != self.batch:
            raise InputError(f"the cache holds batch {self.batch}, got {b} sequences; call reset({b}) first")
        if self.length + t > self.context:
            raise InputError(f"{self.length} cached + {t} new positions exceed the context ({self.context})")
        positions = np.tile(np.arange(self.length, self.length + t, dtype=np.int64), (b, 1))  # (B, T_new)
        bind = self._binding
        bind.bind_cpu_input("tokens", tokens)
        bind.bind_cpu_input("positions", positions)
        for (past, _), value in zip(self._cache_names, self._cache):
            bind.bind_ortvalue_input(past, value)
        bind.bind_output(LOGITS_OUTPUT, "cpu")
        for _, present in self._cache_names:
            bind.bind_output(present, "cpu")  # onnxruntime allocates it; it becomes the next past
        self._sess.run_with_iobinding(bind)
        outputs = bind.get_outputs()  # logits, then present.* in binding order
        self._cache = list(outputs[1:])
        self.length += t
        return outputs[0].numpy()[:, -1]  # (B, vocab)


def generate(decoder: Decoder, prompt: Sequence[int], max_new_tokens: int, temperature: float = 0.8,
             top_k: int = 50, top_p: float = 1.0, seed: int = 1,
             on_token: Callable[[int], None] | None = None) -> tuple[list[int], bool]:
    """Up to ``max_new_tokens`` ids after ``prompt`` (one sequence); returns (new ids,
    stopped at the context). ``on_token`` sees each id as it is chosen."""
    check_options(temperature, top_k, top_p, max_new_tokens)
    if not len(prompt):
        raise InputError("the prompt is empty; give at least one token")
    if len(prompt) > decoder.context:
        raise InputError(f"the prompt is {len(prompt)} tokens, longer than the context ({decoder.context})")
    rng = np.random.default_rng(seed)
    decoder.reset(1)
    logits = decoder(np.asarray(prompt, np.int64)[None, :])[0]  # (vocab,)
    out: list[int] = []
    while True:
        token = pick(logits, temperature, top_k, top_p, rng)
        out.append(token)
        if on_token is not None:
            on_token(token)
        if len(out) == max_new_tokens:
            return out, False
        if decoder.length == decoder.context:  # the new token would need position `context`
            return out, True
        logits = decoder(np.array([[token]], np.int64))[0]


def continue_ids(decoder: Decoder, prompt: Sequence[int], n: int, temperature: float = 0.8, seed: int = 0,
                 limit: int | None = None) -> list[int]:
    """``n`` ids after ``prompt``, each drawn by :func:`pick` (no top-k or top-p) from the first
    ``limit`` logits (all: None), for any ``n``: where :func:`generate` stops at the context, this
    refills the cache from the last half context of the sequence (one prefill) and goes on, so every
    token sees between half a context and a whole one, at one prefill per half context. For
    ``runtimes train``'s sample at the end of a run; the prompt's last ``context`` ids are read."""
    rng = np.random.default_rng(seed)
    seq = [int(i) for i in prompt][-decoder.context:]
    if not seq:
        raise InputError("the prompt is empty; give at least one token")
    keep = max(1, decoder.context // 2)
    decoder.reset(1)
    logits = decoder(np.asarray(seq, np.int64)[None, :])[0]  # (vocab,)
    out: list[int] = []
    while len(out) < n:
        token = pick(logits[:limit], temperature, 0, 1.0, rng)
        out.append(token)
        seq.append(token)
        if len(out) == n:
            break
        if decoder.length == decoder.context:  # full: start again from the last half context
            decoder.reset(1)
            logits = decoder(np.asarray(seq[-keep:], np.int64)[None, :])[0]
        else:
            logits = decoder(np.array([[token]], np.int64))[0]
    return out


# --------------------------------------------------------------------------- loading
def load_for_sampling(checkpoint: str | Path | None = None, artifacts: str | Path | None = None
                      ) -> tuple[Artifacts, dict[str, np.ndarray]]:
    """The artifact folder and the parameters to sample with: a checkpoint's (on the folder it
    records, or ``artifacts``), or the folder's initial weights. Checks only what sampling
    opens: decoder.onnx and, without a checkpoint, weights.safetensors (hashes, inputs and
    outputs against the manifest)."""
    if checkpoint is None and artifacts is None:
        raise InputError("give --checkpoint or --artifacts")
    ckpt = None
    if checkpoint is not None:
        from .checkpoint import load_checkpoint

        ckpt = load_checkpoint(checkpoint)
        artifacts = artifacts or ckpt.artifacts
    art = load_artifacts(artifacts, verify=False)
    if DECODER not in art.manifest["files"]:
        raise ArtifactError(f"{art.folder} has no {DECODER} (built before generation was added); rebuild it with "
                            f"python -m graphgen build (checkpoints carry over)")
    opened = [DECODER] + ([] if ckpt else ["weights.safetensors"]) + ([BASE_FILE] if art.lora else [])
    for name in opened:
        path, info = art.path(name), art.manifest["files"][name]
        if not path.is_file():
            raise ArtifactError(f"{art.folder}: file {name} listed in manifest.json is missing")
        if path.stat().st_size != info["bytes"] or sha256_file(path) != info["sha256"]:
            raise ArtifactError(f"{path}: size or sha256 differs from manifest.json (corrupted or from another build)")
    check_models(art, only=(DECODER,))
    if ckpt is None:
        return art, art.merged(art.initial_weights())  # a LoRA folder: the adapters merged into the base
    check_base(ckpt, art, str(checkpoint))
    if ckpt.fingerprint != art.fingerprint:
        raise CheckpointError(f"{checkpoint} was written for another model (fingerprint {ckpt.fingerprint}) than "
                              f"the artifacts in {art.folder} ({art.fingerprint})")
    check_weights(ckpt.params, art, str(checkpoint), error=CheckpointError)
    return art, art.merged(ckpt.params)


@dataclass
class SampleOptions:
    checkpoint: str | None = None
    artifacts: str | None = None
    prompt: str = ""
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 1.0
    seed: int = 1
    threads: int | None = None


def sample(o: SampleOptions, out=None, err=None) -> dict:
    """The CLI's work: the prompt, then each token's text as it comes, written to ``out``
    (stdout). Options are checked before anything is loaded."""
    out = out or sys.stdout
    err = err or sys.stderr
    check_options(o.temperature, o.top_k, o.top_p, o.max_new_tokens)
    if o.threads is not None and o.threads < 1:
        raise InputError(f"--threads must be >= 1, got {o.threads}")
    if not o.prompt:
        raise InputError("--prompt is empty; give at least one character")
    art, params = load_for_sampling(o.checkpoint, o.artifacts)
    tok = tokenizer_for(art)
    prompt = tok.encode(o.prompt)
    context = art.config["context"]
    if len(prompt) > context:
        raise InputError(f"--prompt is {len(prompt)} tokens, longer than the context ({context})")
    bad = [i for i in prompt if not 0 <= i < art.config["vocab"]]
    if bad:
        raise InputError(f"--prompt has token ids {bad[:5]} outside the vocabulary (0..{art.config['vocab'] - 1})")
    decoder = Decoder(art, params, o.threads)
    stream = tok.stream()
    out.write(o.prompt)
    out.flush()

    def show(token: int) -> None:
        text = stream.push(token)
        if text:
            out.write(text)
            out.flush()

    t0 = time.perf_counter()
    ids, at_context = generate(decoder, prompt, o.max_new_tokens, o.temperature, o.top_k, o.top_p, o.seed, show)
    seconds = time.perf_counter() - t0
    out.write(stream.end())
    out.flush()
    if at_context:
        print(f"\nstopped after {len(ids)} of {o.max_new_tokens} tokens: the sequence fills the context "
              f"({context} tokens)", file=err)
    return {"tokens": ids, "stopped_at_context": at_context, "seconds": seconds}
