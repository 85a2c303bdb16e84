"""One benchmark participant in its own process, driven over stdin/stdout (JSON lines).

    python -m bench.worker --kind ort|ort-split|ort-training|openvino|torch|torch-sdpa|sgemm \
        --artifacts DIR --batch B --seq T --threads N [--device cpu|cuda]

The worker loads its model, answers ``{"ready": ...}``, then runs one timed
unit per ``step`` line (one full training step, or one 2048^3 float32 NumPy
matmul for ``sgemm``) and answers ``{"ms": ..., "loss": ...}``; ``quit``
answers with the process's peak RSS (getrusage ru_maxrss) and exits. One
process per participant keeps each one's peak RSS its own (imports, model,
optimizer state, arena); the driver alternates steps across the processes so
machine drift hits all of them alike. Native libraries print to stdout, so the
protocol uses a duplicate of the original stdout and fd 1 is sent to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

KINDS = ("ort", "ort-split", "ort-training", "openvino", "torch", "torch-sdpa", "sgemm", "check", "peft")
N_BATCHES = 4
LR = 1e-4
SGEMM_N = 2048


def batches(vocab: int, batch: int, seq: int, seed: int = 1234):
    """N_BATCHES fixed (tokens, positions, labels) int64 batches; labels are the next tokens."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(N_BATCHES):
        ids = rng.integers(0, vocab, size=(batch, seq + 1), dtype=np.int64)
        pos = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
        out.append((np.ascontiguousarray(ids[:, :-1]), pos, np.ascontiguousarray(ids[:, 1:])))
    return out


def rss_mb() -> float:
    """Current resident set size (MiB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class _Ort:
    def __init__(self, a):
        # onnxruntime-training's `import onnxruntime` imports torch whenever torch is installed
        # (to probe for ORTModule), which costs ~250 MiB of RSS and seconds of start-up. The
        # runtimes never use torch, and an environment that runs them needs none: measure
        # them as they run there. (No effect with plain onnxruntime, which never imports it.)
        sys.modules.setdefault("torch", None)
        import runtimes

        # ort-split: the `ort` runtime through grad_step.onnx + apply_step.onnx, the path of
        # --accumulate and data parallel, with the whole batch as one micro-batch: its cost
        # next to the single train_step graph's (two sessions, gradients through the host).
        self.split = a.kind == "ort-split"
        self.rt = runtimes.load(a.artifacts, runtime="ort" if self.split else a.kind, device=a.device,
                                threads=a.threads, verify=False)
        cfg = self.rt.art.config
        self.hp_args = dict(beta1=cfg["beta1"], beta2=cfg["beta2"], eps=cfg["eps"], weight_decay=cfg["weight_decay"])
        self.data = batches(cfg["vocab"], a.batch, a.seq)
        self.make_hp = runtimes.make_hp

    def step(self, i: int) -> float:
        tok, pos, lab = self.data[i % N_BATCHES]
        hp = self.make_hp(LR, step=self.rt.step_count + 1, **self.hp_args)
        if self.split:
            return self.rt.step_accumulated([(tok, pos, lab)], hp)
        return self.rt.step(tok, pos, lab, hp)


def _config_and_weights(folder: str) -> tuple[dict, dict]:
    """The manifest's config and the initial weights in manifest order, read without
    the runtimes package (the torch participants must not import onnxruntime)."""
    from safetensors.numpy import load_file

    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    weights = load_file(os.path.join(folder, "weights.safetensors"))
    return manifest["config"], {p["name"]: weights[p["name"]] for p in manifest["parameters"]}


class _Torch:
    def __init__(self, a):
        import torch

        from bench.torch_model import BatchedGPT2

        torch.set_num_threads(a.threads)
        cfg, weights = _config_and_weights(a.artifacts)
        self.model = BatchedGPT2(cfg, weights, attention="sdpa" if a.kind == "torch-sdpa" else "matmul",
                                 device=a.device)
        del weights
        self.opt = dict(betas=(cfg["beta1"], cfg["beta2"]), eps=cfg["eps"], weight_decay=cfg["weight_decay"])
        dev = self.model.device
        self.data = [tuple(torch.from_numpy(x).to(dev) for x in b) for b in batches(cfg["vocab"], a.batch, a.seq)]
        self.sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)

    def step(self, i: int) -> float:
        loss = self.model.step(*self.data[i % N_BATCHES], lr=LR, **self.opt)
        self.sync()
        return loss


class _Peft:
    """PEFT's LoRA on transformers' GPT2LMHeadModel (PyTorch eager, its default sdpa attention), the
    rank and targets of the LoRA artifact folder given, AdamW over the adapters: what a LoRA step of
    this project is compared with (bench/lora.py). Weights are transformers' random init: the cost of
    a step does not depend on their values."""

    def __init__(self, a):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.set_num_threads(a.threads)
        with open(os.path.join(a.artifacts, "manifest.json")) as f:
            manifest = json.load(f)
        cfg, lora = manifest["config"], manifest["lora"]
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=cfg["vocab"], n_positions=cfg["context"], n_embd=cfg["d_model"], n_layer=cfg["n_layers"],
            n_head=cfg["n_heads"], n_inner=cfg["d_ff"], activation_function="gelu_new", layer_norm_epsilon=1e-5,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
        self.model = get_peft_model(model, LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=0.0,
                                                      target_modules=lora["targets"], fan_in_fan_out=True))
        self.model.train()
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=LR,
                                     betas=(cfg["beta1"], cfg["beta2"]), eps=cfg["eps"], weight_decay=cfg["weight_decay"])
        self.data = [tuple(torch.from_numpy(x) for x in b) for b in batches(cfg["vocab"], a.batch, a.seq)]
        self.torch = torch

    def step(self, i: int) -> float:
        tok, pos, lab = self.data[i % N_BATCHES]
        self.opt.zero_grad(set_to_none=True)
        logits = self.model(input_ids=tok, position_ids=pos).logits
        loss = self.torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1))
        loss.backward()
        self.opt.step()
        return float(loss)


class _Sgemm:
    def __init__(self, a):
        import numpy as np

        rng = np.random.default_rng(0)
        self.a = rng.standard_normal((SGEMM_N, SGEMM_N), dtype=np.float32)
        self.b = rng.standard_normal((SGEMM_N, SGEMM_N), dtype=np.float32)
        self.c = np.empty_like(self.a)
        np.matmul(self.a, self.b, out=self.c)  # warm the BLAS thread pool

    def step(self, i: int) -> float:
        import numpy as np

        np.matmul(self.a, self.b, out=self.c)
        return float("nan")


class _Check:
    """Not timed: the batched baseline's loss at init against the test oracle's (per-head loop)."""

    def __init__(self, a):
        import torch

        from bench.torch_model import BatchedGPT2
        from tests.oracle.torch_gpt2 import TorchGPT2

        torch.set_num_threads(a.threads)
        cfg, weights = _config_and_weights(a.artifacts)
        tok, pos, lab = batches(cfg["vocab"], a.batch, a.seq)[0]
        self.result = {"oracle": TorchGPT2(cfg, weights, threads=a.threads, deterministic=False).loss(tok, pos, lab)}
        t = [torch.from_numpy(x) for x in (tok, pos, lab)]
        with torch.no_grad():
            for att in ("matmul", "sdpa"):
                self.result["torch" if att == "matmul" else "torch-sdpa"] = float(
                    BatchedGPT2(cfg, weights, attention=att).loss(*t))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.worker")
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument("--artifacts")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    a = p.parse_args(argv)

    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj):
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    t0 = time.perf_counter()
    try:
        runner = {"ort": _Ort, "ort-split": _Ort, "ort-training": _Ort, "openvino": _Ort, "torch": _Torch, "torch-sdpa": _Torch, "sgemm": _Sgemm,
                  "check": _Check, "peft": _Peft}[a.kind](a)
    except Exception as e:  # reported to the driver, which prints it and carries on without this participant
        send({"ready": False, "error": f"{type(e).__name__}: {e}"})
        return 1
    ready = {"ready": True, "load_s": time.perf_counter() - t0, "rss_mb": rss_mb()}
    if a.kind == "check":
        ready["losses"] = runner.result
    send(ready)
    i = 0
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            t = time.perf_counter()
            try:
                loss = runner.step(i)
            except Exception as e:
                send({"error": f"{type(e).__name__}: {e}"})
                return 1
            ms = (time.perf_counter() - t) * 1e3
            i += 1
            send({"ms": ms, "loss": loss})
        elif cmd == "quit":
            send({"peak_rss_mb": peak_rss_mb(), "rss_mb": rss_mb()})
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
