# make demo   set up .venv and run the main job
# make test   set up .venv and run the tests
# make lab    set up .venv and open JupyterLab on notebooks/
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= out

.PHONY: demo test lab venv build-ops bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[notebooks,test]"
	touch $(STAMP)

test: venv
	$(PY) -m pytest

demo: venv
	$(PY) -m ddetr_tutorial build-ops
	$(PY) benchmarks/bench_ms_deform_attn.py --configs tiny --out $(OUT)/bench_ms_deform_attn.json --figure $(OUT)/bench_ms_deform_attn.png

lab: venv
	mkdir -p notebooks
	$(VENV)/bin/jupyter lab notebooks/

build-ops: venv
	$(PY) -m ddetr_tutorial build-ops

bench: venv
	$(PY) benchmarks/bench_ms_deform_attn.py --figure benchmarks/results/ms_deform_attn.png

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
