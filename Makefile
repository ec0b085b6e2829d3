# smca_detr: the two commands of README.md.
#   make demo   - build the embedded dataset; evaluate the shipped SMCA checkpoint, fine-tune it briefly,
#                 evaluate again, write pictures (CPU)
#   make test   - run the test suite
# Both create or refresh the virtual environment in .venv/ first (reused when up to date).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.smca_detr-installed
PIP    := $(PY) -m pip --disable-pip-version-check

.PHONY: venv test test-parity demo clean-venv

venv: $(STAMP)

$(STAMP): requirements.txt setup.py tools/install_detectron2.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing requirements.txt into $(VENV) (log: $(VENV)/pip.log)"
	@$(PIP) install -q -r requirements.txt > $(VENV)/pip.log 2>&1 || (cat $(VENV)/pip.log; exit 1)
	$(PY) tools/install_detectron2.py
	@$(PIP) install -q --no-deps --no-build-isolation -e . > $(VENV)/pip-e.log 2>&1 || (cat $(VENV)/pip-e.log; exit 1)
	@$(PY) -c "import smca_detr; print('smca_detr', smca_detr.__version__, 'installed')"
	@touch $(STAMP)

test: venv
	$(PY) -m pytest -q tests

test-parity: venv
	$(PY) -m pytest -q tests -k parity

demo: venv
	$(PY) tools/run_demo.py

clean-venv:
	rm -rf $(VENV)
