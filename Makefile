# One entry point for set-up and tests. Everything installs into ./.venv.
#
#   make demo                  install, then the whole product end to end (jobs/demo.py)
#   make test                  install everything (torch first), then lint and run the tests
#   make test-fast             the same without the slow tests (Ray clusters, services): ~2.5 min
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
# pytest-xdist workers: two suit the 2-core CI machine (most tests wait on processes they
# start); each worker runs whole modules, with its own session services (Ray, S3, MLflow).
TEST_WORKERS ?= 2


.PHONY: install test test-fast lint demo bench-model bench-data bench-train bench-vtab bench-checkpoint clean

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
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope

test-fast: install lint
	$(PY) -m pytest -m "not slow" -n $(TEST_WORKERS) --dist loadscope

# The whole product on the embedded default (jobs/demo.py): a local stack (Ray head, S3
# endpoint, MLflow server), demo shards, two pretraining runs and their VTAB evaluations
# through `ray job submit`, the VTAB tables and a comparison of the runs.
demo: install
	$(PY) jobs/demo.py

bench-model: install
	$(PY) bench/model.py

bench-data: install
	$(PY) bench/data.py

bench-train: install
	$(PY) bench/train.py

bench-vtab: install
	$(PY) bench/vtab.py

bench-checkpoint: install
	$(PY) bench/checkpoint.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
