# The two commands of the README:
#   make demo   -- set up (first time only) and run the offline main job
#   make test   -- set up (first time only) and run ruff + the whole test suite
#
# Both share one virtualenv. It lives in a cache folder keyed by a hash of the
# requirements files (so CI and every clone of this repo reuse it, and a change
# of requirements builds a new one), and `.venv` in the repo points at it.
# A venv is used only once its `.complete` stamp exists: a half-finished
# install (killed, out of disk) is thrown away and rebuilt, never reused.

PYTHON   ?= python3
CACHE    ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/tgr-moe
KEY      := $(shell cat requirements.txt requirements-dev.txt | $(PYTHON) -c "import hashlib,sys;print(hashlib.sha256(sys.stdin.buffer.read()+sys.version.encode()).hexdigest()[:12])")
VENV     ?= $(CACHE)/venv-$(KEY)
PY       := $(VENV)/bin/python

.PHONY: demo test lint format bench venv clean

venv: $(VENV)/.complete

# No file prerequisites on purpose: the folder name already hashes the requirements'
# contents, and a fresh clone's new file times must not rebuild a finished venv.
$(VENV)/.complete:
	@mkdir -p $(CACHE)
	@if [ -d "$(VENV)" ] && [ ! -f "$@" ]; then echo "removing unfinished venv $(VENV)"; rm -rf "$(VENV)"; fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt -r requirements-dev.txt
	$(PY) -c "import torch, torchvision, einops, pytest; print('torch', torch.__version__)"
	@touch $@
	@ln -sfn $(VENV) .venv

demo: venv
	@ln -sfn $(VENV) .venv
	$(PY) demo.py

test: venv
	@ln -sfn $(VENV) .venv
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

format: venv
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: venv
	$(PY) benchmarks/moe_layer.py

clean:
	rm -rf .venv .pytest_cache __pycache__ */__pycache__
