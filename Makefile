# One entry point for set-up and tests. Everything installs into ./.venv.
#
#   make demo                  install, write demo shards, pretrain a small ViT on local Ray
#   make test                  install everything (torch first), then lint and run the tests
#   make install               just the install
#   make bench-model           our ViT against Hugging Face's, forward+backward images/s
#
# torch is installed on its own, before the project, so that you choose the build:
#   make test                                        # torch==2.13.0 as pip resolves it
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu     # CPU-only build
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cu128   # a CUDA build

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

DEMO_DATA ?= $(HOME)/vit-runs/demo-shards

.PHONY: install test lint demo bench-model bench-data bench-train bench-vtab clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install --quiet -e '.[dev]'
	$(PY) -c "import torch, ray, mlflow; print('installed: torch', torch.__version__, \
	  '| ray', ray.__version__, '| mlflow', mlflow.__version__, \
	  '| cuda', torch.cuda.is_available())"
	touch $@

lint: install
	$(VENV)/bin/ruff check .

test: install lint
	$(PY) -m pytest

# The main job end to end on the embedded default: local Ray, demo shards written locally,
# local MLflow (SQLite under ~/vit-runs). Prints where the checkpoint and the MLflow run are.
demo: install
	$(PY) jobs/make_shards.py synthetic - $(DEMO_DATA) --num-samples 2048 --num-classes 10 \
	  --image-size 64 --shard-size-mb 1
	$(PY) jobs/pretrain.py --preset smoke --data $(DEMO_DATA) --name demo

bench-model: install
	$(PY) bench/model.py

bench-data: install
	$(PY) bench/data.py

bench-train: install
	$(PY) bench/train.py

bench-vtab: install
	$(PY) bench/vtab.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
