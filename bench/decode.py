"""Generation speed: decoder.onnx's key/value cache against transformers' ``generate``.

    python -m bench.decode [--configs small,gpt2] [--threads N] [--lengths 1,256,1000]
                           [--prompt-tokens 16] [--repeats 3] [--no-hf]

Per config (a preset, with the context raised to fit the prompt and the longest
run: small's 256 becomes 1024; the work per token at a given length does not
depend on the context), from the builder's decoder.onnx and initial weights:

- tokens/s for each of ``--lengths`` generated tokens, greedy, one sequence,
  timed from the prompt to the last token (prefill included), over
  ``--repeats`` runs: median (min-max);
- the time of each token against the length of the sequence so far, from the
  longest runs (median over repeats of the median of 10 steps around each length). With the cache a
  step costs the weights once plus attention over the T tokens so far, so it
  grows only with that O(T) term; next to it, one forward.onnx call on the whole
  sequence, what a step costs without a cache;
- the same for transformers' GPT2LMHeadModel ``generate`` (PyTorch eager, its
  default attention, greedy, its own cache), on the same weights converted to its
  layout (:func:`hf_gpt2`), when transformers is importable. Both get the same
  thread count (onnxruntime intra-op threads, torch.set_num_threads).

Everything runs in this one process, onnxruntime first, then PyTorch, so the
two thread pools do not run at the same time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------- transformers
def hf_gpt2(config: dict, weights: dict[str, np.ndarray]):
    """transformers' GPT2LMHeadModel holding ``weights`` (this project's layout, docs/semantics.md).

    GPT-2's Conv1D stores (in, out), the transpose of our (out, in); c_attn is q, k
    and v side by side (out = 3d), each our stacked (H, dh, d) heads flattened to
    (d, d) with head j at rows j*dh; the value bias is added before attention there
    and after it here, the same function since every attention row sums to 1;
    lm_head is tied to wte."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    v, c, d, h, f, n = (int(config[k]) for k in ("vocab", "context", "d_model", "n_heads", "d_ff", "n_layers"))
    hf_cfg = GPT2Config(vocab_size=v, n_positions=c, n_embd=d, n_layer=n, n_head=h, n_inner=f,
                        activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
                        pad_token_id=None)
    model = GPT2LMHeadModel(hf_cfg)
    w = {k: np.asarray(a, np.float32) for k, a in weights.items()}
    sd = {"transformer.wte.weight": w["wte"], "transformer.wpe.weight": w["wpe"],
          "transformer.ln_f.weight": w["lnf_g"], "transformer.ln_f.bias": w["lnf_b"], "lm_head.weight": w["wte"]}
    for layer in range(n):
        p, q = f"h{layer}.", f"transformer.h.{layer}."
        sd[q + "ln_1.weight"], sd[q + "ln_1.bias"] = w[p + "ln1_g"], w[p + "ln1_b"]
        sd[q + "ln_2.weight"], sd[q + "ln_2.bias"] = w[p + "ln2_g"], w[p + "ln2_b"]
        sd[q + "attn.c_attn.weight"] = np.concatenate([w[p + k].reshape(d, d).T for k in ("w_q", "w_k", "w_v")], 1)
        sd[q + "attn.c_attn.bias"] = np.concatenate([w[p + k].reshape(d) for k in ("b_q", "b_k", "b_v")])
        sd[q + "attn.c_proj.weight"], sd[q + "attn.c_proj.bias"] = w[p + "w_o"].T, w[p + "b_o"]
        sd[q + "mlp.c_fc.weight"], sd[q + "mlp.c_fc.bias"] = w[p + "fc_w"].T, w[p + "fc_b"]
        sd[q + "mlp.c_proj.weight"], sd[q + "mlp.c_proj.bias"] = w[p + "pr_w"].T, w[p + "pr_b"]
    missing, unexpected = model.load_state_dict({k: torch.tensor(np.ascontiguousarray(a)) for k, a in sd.items()},
                                                strict=False)
    persistent = set(model.state_dict())
    missing = [k for k in missing if k in persistent]
    if missing or unexpected:
        raise RuntimeError(f"GPT2LMHeadModel's state dict: missing {missing}, unexpected {unexpected}")
    return model.eval()


def hf_greedy(model, prompt: list[int], n: int, on_token=None) -> list[int]:
    """``n`` greedy tokens after ``prompt`` with ``generate`` (its key/value cache)."""
    import torch

    class Streamer:  # generate calls put() with the prompt first, then with each new token
        def __init__(self):
            self.first = True

        def put(self, value):
            if self.first:
                self.first = False
            elif on_token is not None:
                on_token(int(value.reshape(-1)[0]))

        def end(self):
            pass

    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0, streamer=Streamer() if on_token else None)
    return out[0, len(prompt):].tolist()


# --------------------------------------------------------------------------- timing
def _timed(run, n: int) -> tuple[float, list[float]]:
    """(seconds for ``run(on_token)`` to produce ``n`` tokens, seconds of each token)."""
    marks = []
    t0 = time.perf_counter()
    run(lambda _token: marks.append(time.perf_counter()))
    total = time.perf_counter() - t0
    assert len(marks) == n, (len(marks), n)
    return total, list(np.diff([t0] + marks))


def _window(runs: list[list[float]], at: int, half: int = 5) -> float:
    """Seconds of the ``at``-th token (1-based): the median over runs of the median of the
    steps around it (the first token, the prefill, alone)."""
    if at == 1:
        half = 0
    return statistics.median(statistics.median(r[max(1, at - half) - 1:min(len(r), at + half)]) for r in runs)


def _rate(seconds: list[float], n: int) -> str:
    rates = sorted(n / s for s in seconds)
    return f"{statistics.median(rates):8.1f} ({rates[0]:.0f}-{rates[-1]:.0f})"


def bench_config(name: str, lengths: list[int], prompt_tokens: int, repeats: int, threads: int, hf: bool) -> None:
    from contract.manifest import describe_io
    from graphgen.config import GPT2Config, param_specs
    from graphgen.decoder import build_decoder
    from graphgen.init import init_weights
    from graphgen.model import build_forward_logits
    from runtimes.artifacts import Artifacts

    longest = max(lengths)
    base = GPT2Config.preset(name)
    context = max(base.context, 1 << (prompt_tokens + longest - 1).bit_length())
    cfg = GPT2Config.preset(name, context=context)
    t0 = time.perf_counter()
    weights = init_weights(cfg)
    import onnx

    with tempfile.TemporaryDirectory(prefix="bench-decode-") as folder:
        tmp = Path(folder)
        model = build_decoder(cfg)
        onnx.save(model, str(tmp / "decoder.onnx"))
        onnx.save(build_forward_logits(cfg), str(tmp / "forward.onnx"))
        manifest = {"config": cfg.to_dict(), "files": {"decoder.onnx": {}, "forward.onnx": {}},
                    "parameters": [{"name": n, "shape": list(s)} for n, s in param_specs(cfg)],
                    "models": {"decoder.onnx": describe_io(model)}}
        _bench(Artifacts(tmp, manifest), cfg, base.context, weights, lengths, prompt_tokens, repeats, threads, hf,
               time.perf_counter() - t0)


def _bench(art, cfg, preset_context, weights, lengths, prompt_tokens, repeats, threads, hf, build_s) -> None:
    from runtimes.ort_env import import_onnxruntime
    from runtimes.sample import Decoder, generate, session_options

    name, context, longest, tmp = cfg.name, cfg.context, max(lengths), art.folder
    print(f"\n{name}: vocab {cfg.vocab}, context {cfg.context}"
          f"{'' if context == preset_context else f' (preset {preset_context}, raised to fit)'}, d_model {cfg.d_model}, "
          f"{cfg.n_heads} heads, d_ff {cfg.d_ff}, {cfg.n_layers} layers; prompt {prompt_tokens} tokens, greedy, "
          f"{threads} threads (built in {build_s:.0f}s); load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")

    prompt = np.random.default_rng(0).integers(0, cfg.vocab, prompt_tokens).tolist()
    dec = Decoder(art, weights, threads)
    generate(dec, prompt, 8, temperature=0)  # warm-up: first-run allocations
    ours = {n: [] for n in lengths}
    ours_steps: list[list[float]] = []  # per repeat, each token's seconds in the longest run
    ours_tokens: list[int] = []
    for _ in range(repeats):
        for n in lengths:
            tokens: list[int] = []
            total, steps = _timed(lambda cb: tokens.extend(generate(dec, prompt, n, temperature=0, on_token=cb)[0]), n)
            ours[n].append(total)
            if n == longest:
                ours_steps.append(steps)
                ours_tokens = tokens

    # one forward.onnx call on the whole sequence: a step's cost without a cache
    ort = import_onnxruntime()
    fwd = ort.InferenceSession(str(tmp / "forward.onnx"), session_options(threads), providers=["CPUExecutionProvider"])
    at = sorted({1, *[n for n in (64, 256, 512, 1000) if n <= longest], longest})
    full = prompt + ours_tokens
    no_cache = {}
    for k in at:
        t = prompt_tokens + k - 1  # the sequence the k-th token is predicted from
        feeds = {"tokens": np.array([full[:t]]), "positions": np.arange(t)[None, :], **weights}
        fwd.run(None, feeds)
        times = []
        for _ in range(3):
            s = time.perf_counter()
            fwd.run(None, feeds)
            times.append(time.perf_counter() - s)
        no_cache[k] = min(times)
    del fwd, dec

    theirs, theirs_steps = None, []
    if hf:
        import torch

        if torch.get_num_threads() != threads:  # main() set OMP_NUM_THREADS before torch loaded
            torch.set_num_threads(threads)
        model = hf_gpt2(cfg.to_dict(), weights)
        hf_greedy(model, prompt, 8)
        theirs = {n: [] for n in lengths}
        for _ in range(repeats):
            for n in lengths:
                tokens = []
                total, steps = _timed(lambda cb: tokens.extend(hf_greedy(model, prompt, n, cb)), n)
                theirs[n].append(total)
                if n == longest:
                    theirs_steps.append(steps)
                    same = tokens == ours_tokens
        print(f"greedy tokens identical to transformers' over {longest}: {same}")

    print(f"{'generated':>10} | {'decoder.onnx tokens/s':>24}" + (f" | {'transformers tokens/s':>24}" if hf else ""))
    for n in lengths:
        print(f"{n:>10} | {_rate(ours[n], n):>24}" + (f" | {_rate(theirs[n], n):>24}" if hf else ""))
    print(f"ms per token at the k-th generated token (sequence length prompt + k - 1); first: the prefill")
    print(f"{'k':>10} | {'decoder.onnx':>12}" + (f" | {'transformers':>12}" if hf else "")
          + f" | {'forward.onnx, no cache':>22}")
    for k in at:
        row = f"{k:>10} | {_window(ours_steps, k) * 1e3:12.2f}"
        if hf:
            row += f" | {_window(theirs_steps, k) * 1e3:12.2f}"
        print(row + f" | {no_cache[k] * 1e3:22.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="small", help="comma-separated presets (default small; gpt2 too)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both (default: all cores)")
    p.add_argument("--lengths", default="1,256,1000", help="generated tokens per timed run (default 1,256,1000)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-hf", action="store_true", help="skip transformers even where it is importable")
    a = p.parse_args(argv)
    lengths = sorted({int(x) for x in a.lengths.split(",")})
    if lengths[0] < 1 or a.prompt_tokens < 1 or a.repeats < 1 or a.threads < 1:
        p.error("lengths, --prompt-tokens, --repeats and --threads must be >= 1")
    # torch reads these when it loads. Calling torch.set_num_threads(2) instead, even where
    # 2 is already the count, made every small op in generate take about 8 ms (torch 2.13,
    # 2 cores): 60 ms a token on small where 6 is the figure without the call.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(a.threads)
    hf = not a.no_hf
    if hf:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("transformers is not importable here: decoder.onnx only")
            hf = False
    for name in a.configs.split(","):
        bench_config(name.strip(), lengths, a.prompt_tokens, a.repeats, a.threads, hf)
    return 0


if __name__ == "__main__":
    sys.exit(main())
