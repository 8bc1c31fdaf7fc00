# One entry point for set-up and tests. Everything installs into ./.venv.
#
#   make demo                  install, then the whole product end to end (jobs/demo.py)
#   make test                  install everything (torch first), then lint and run the tests
#   make test-fast             the same without the slow tests (Ray clusters, services): ~2.5 min
#   make install               just the install
#   make bench-model           our ViT against Hugging Face's, forward+backward images/s
#   make interop-env           a second venv (.venv-interop) with timm and transformers, for the
#                              tests marked `interop` (pytest -m interop): they load our exports
#                              there as the other library's users do and compare the logits
#   make test-interop          builds it, then runs just those tests (not part of `make test`)
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
# pytest-xdist workers: each runs whole modules, heaviest first (tests/durations.json), with
# its own session services (Ray, S3, MLflow). On 2 cores the suite takes 23-26 minutes of
# pytest with two workers (fresh-clone runs, 2026-12-06); `make test TEST_WORKERS=1` runs it
# in one process.
TEST_WORKERS ?= 2
XDIST := $(if $(filter-out 0 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder,)


.PHONY: install test test-fast lint interop-env test-interop demo bench-model bench-data bench-train bench-vtab bench-checkpoint clean

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
	$(PY) -m pytest $(XDIST)

test-fast: install lint
	$(PY) -m pytest -m "not slow" $(XDIST)

# The other libraries, in an environment of their own: timm needs torchvision, and PyPI's
# torchvision needs PyPI's (CUDA) torch of the same release (with a CPU torch it fails on import:
# "operator torchvision::nms does not exist"). Neither is a dependency of the project; the tests
# marked `interop` run this environment's python in a subprocess and skip, naming this target,
# without it. About 3 GB of wheels, 5.6 GB installed (bench/RESULTS.md has the timing).
INTEROP_VENV ?= .venv-interop
INTEROP_PKGS ?= torch==2.14.1 torchvision==0.29.1 timm==1.0.31 transformers==5.25.0 \
	safetensors numpy

interop-env: $(INTEROP_VENV)/.installed

$(INTEROP_VENV)/.installed: Makefile
	test -x $(INTEROP_VENV)/bin/python || $(PYTHON) -m venv $(INTEROP_VENV)
	$(INTEROP_VENV)/bin/python -m pip install --quiet $(INTEROP_PKGS)
	$(INTEROP_VENV)/bin/python -c "import torch, torchvision, timm, transformers; \
	  print('interop env: torch', torch.__version__, '| torchvision', torchvision.__version__, \
	  '| timm', timm.__version__, '| transformers', transformers.__version__)"
	touch $@

test-interop: install interop-env
	$(PY) -m pytest -m interop

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
	rm -rf $(VENV) $(INTEROP_VENV) .pytest_cache .ruff_cache
