# Front door: `make demo` runs the main job on the built-in model, `make test` runs the tests.
# Each creates .venv (python3.11 -m venv + scripts/setup.sh) when it is missing.
PYTHON ?= python3.11
# pytest workers (pytest-xdist): one per core of the 2-core reference machine; whole test files per
# worker (--dist loadfile), so a file's module fixtures are built once
JOBS ?= 2
PYTEST_ARGS ?= -n $(JOBS) --dist loadfile
VENV := .venv
CORE_VENV := .venv-core

.PHONY: demo test test-core setup

$(VENV)/.setup-done: pyproject.toml scripts/setup.sh
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	sh scripts/setup.sh
	touch $@

setup: $(VENV)/.setup-done

demo: $(VENV)/.setup-done
	$(VENV)/bin/lora-onnx demo -o lora-onnx-demo

test: $(VENV)/.setup-done
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Graph work without torch: core dependencies + [test] only, the tests not marked `torch`.
test-core:
	test -x $(CORE_VENV)/bin/python || $(PYTHON) -m venv $(CORE_VENV)
	$(CORE_VENV)/bin/pip install -q -e ".[test]"
	$(CORE_VENV)/bin/python -c "import importlib.util as u, sys; sys.exit('torch is installed in $(CORE_VENV)' if u.find_spec('torch') else 0)"
	$(CORE_VENV)/bin/python -m pytest $(PYTEST_ARGS) -m "not torch"
