# The two commands of the README. Each sets up .venv (once: a stamp file records the install
# and is renewed when pyproject.toml changes), then does its job.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev,onnx,lightning]'
	# The native gate kernels (pyro_sbp._native), built now rather than at their first use.
	$(VENV)/bin/python -m pyro_sbp._native || echo "native kernels not built: the PyTorch path runs"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m pyro_sbp.demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
