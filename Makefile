# Front door. Each target sets up what it needs, so any of them works first on a fresh machine.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
ORTVENV := .venv-ort
ORTSTAMP:= $(ORTVENV)/.installed
ENGVENV := .venv-engines
ENGSTAMP:= $(ENGVENV)/.installed
CONFIGS ?= tiny small
STEPS   ?=

.PHONY: all venv artifacts train train-dp finetune test parity web soak bench bench-lora clean

all: artifacts

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q -e '.[training,test,mpi]'
	touch $@

# Current onnxruntime (>= 1.20) cannot share an environment with onnxruntime-training:
# the portable `ort` runtime is also tested from this second environment.
$(ORTSTAMP): pyproject.toml
	$(PY) -m venv $(ORTVENV)
	$(ORTVENV)/bin/python -m pip install -q -e '.[ort]'
	touch $@

# Other ONNX engines (OpenVINO, tract, TVM, onnx2torch, tinygrad) for tests/test_engine_conformance.py,
# pinned in tests/engines/requirements.txt; onnx2torch without its torchvision requirement.
$(ENGSTAMP): tests/engines/requirements.txt
	$(PY) -m venv $(ENGVENV)
	$(ENGVENV)/bin/python -m pip install -q -r tests/engines/requirements.txt
	$(ENGVENV)/bin/python -m pip install -q --no-deps onnx2torch==1.5.15
	touch $@

venv: $(STAMP)

artifacts: $(foreach c,$(CONFIGS),artifacts/$(c)/manifest.json)

# An artifact folder is rebuilt when anything it is built from changes: the builder and the contract.
artifacts/%/manifest.json: $(STAMP) $(wildcard graphgen/*.py contract/*.py contract/*.json)
	$(VPY) -m graphgen build --config $* --out artifacts/$*

# The pretrained path end to end (build --from-hf, train with the folder's tokenizer, sample,
# export --hf) on a small stand-in made locally, or HF=DIR, a GPT-2 folder you downloaded.
finetune: $(STAMP)
	$(VPY) scripts/finetune_demo.py $(if $(HF),--hf $(HF)) $(if $(STEPS),--steps $(STEPS))

train: artifacts/small/manifest.json
	$(VPY) -m runtimes train --artifacts artifacts/small --out runs/small $(if $(STEPS),--steps $(STEPS))

# Data parallel on NP ranks of this machine (MPI; see README "More than one machine"). As root Open MPI
# needs --allow-run-as-root; --oversubscribe lets NP exceed the cores.
NP ?= 2
train-dp: artifacts/small/manifest.json
	$(VENV)/bin/mpiexec -n $(NP) --allow-run-as-root --oversubscribe $(VPY) -m runtimes train --data-parallel \
		--artifacts artifacts/small --out runs/small-dp $(if $(STEPS),--steps $(STEPS)) $(if $(SHARD),--shard-optimizer)

WEBPORT  ?= 8000
WEBSTAMP := hosts/web/node_modules/.installed

$(WEBSTAMP): hosts/web/package-lock.json
	cd hosts/web && npm ci --no-audit --no-fund
	touch $@

# The browser page: serves hosts/web and artifacts/ at http://127.0.0.1:$(WEBPORT)/
web: artifacts/tiny/manifest.json $(WEBSTAMP)
	node hosts/web/serve.mjs --artifacts artifacts --port $(WEBPORT)

# The Node host's onnxruntime-node (CPU binaries ship in the package: no install-time download); npm writes this file.
NODESTAMP := hosts/node/node_modules/.package-lock.json

$(NODESTAMP): hosts/node/package-lock.json
	cd hosts/node && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund
	touch $@

TJSSTAMP := tests/transformersjs/node_modules/.installed

# transformers.js for tests/test_transformersjs.py; no install scripts: onnxruntime-node ships its CPU
# binaries and sharp takes its own from the @img/* packages.
$(TJSSTAMP): tests/transformersjs/package-lock.json
	cd tests/transformersjs && npm ci --no-audit --no-fund --ignore-scripts
	touch $@

# Debian's chromium for the headless browser test, and clang for tinygrad's CPU backend (each only if missing).
test: $(STAMP) $(ORTSTAMP) $(ENGSTAMP) $(WEBSTAMP) $(NODESTAMP) $(TJSSTAMP)
	sh scripts/install_debian.sh /usr/bin/chromium chromium fonts-dejavu-core
	sh scripts/install_debian.sh clang clang
	$(VPY) -m pytest -q

# 10,000 steps on tiny with checkpoints every 500: RSS and file descriptors must stay flat.
soak: $(STAMP)
	$(VPY) -m pytest -m soak -s tests/test_soak.py

# Step time, tokens/s, peak RSS and GFLOP/s of each runtime against PyTorch eager, interleaved in one run.
# QUICK=1: small only. DEVICE=cuda, THREADS=N, BENCH_CONFIGS=small,mid,gpt2, RECOMPUTE=1 (build --recompute-attention at every size; by default graphgen recomputes attention and GELU outputs from a context of 1,024 up).
bench: $(STAMP)
	$(VPY) -m bench.run $(if $(QUICK),--quick) $(if $(RECOMPUTE),--recompute-attention) $(if $(DEVICE),--device $(DEVICE)) $(if $(THREADS),--threads $(THREADS)) $(if $(BENCH_CONFIGS),--configs $(BENCH_CONFIGS))

# LoRA (rank 8, every target) against full fine-tuning and PEFT on gpt2 1x1024 (README, LoRA)
bench-lora: $(STAMP)
	$(VPY) -m bench.lora $(if $(THREADS),--threads $(THREADS))

parity: $(STAMP) $(ORTSTAMP)
	$(VPY) -m pytest -q -s tests/test_parity.py

clean:
	rm -rf artifacts runs .pytest_cache
