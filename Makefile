# distortkd — every target sets itself up: `make test` on a fresh clone installs what it needs.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install fashion-mnist test test-fast lint demo study bench bench-gpu table1 table2 table3 fig2 fig3 fig4 clean

install: $(STAMP)
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# Debian's packaged Fashion-MNIST: the real data for the offline demo and real-data tests.
fashion-mnist:
	@test -f $(FMNIST)/train-images-idx3-ubyte.gz || test -f $(FMNIST)/train-images-idx3-ubyte || \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist)

# One pytest worker per core (pytest-xdist; tests are independent, each in its own tmp folders), the
# long tests first in each worker's half of the list (tests/conftest.py). TEST_WORKERS=0: serial.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist worksteal)
test: install fashion-mnist
	$(BIN)/pytest -q $(XDIST) $(PYTEST_ARGS)

test-fast: install
	$(BIN)/pytest -q -m "not slow" $(XDIST) $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check distortkd tests experiments

# The main job, offline: the whole method on real Fashion-MNIST, 10 min for one seed on 2 idle CPU cores.
SEEDS ?= 1
FAST ?= 0
demo: install fashion-mnist
	SEEDS=$(SEEDS) FAST=$(FAST) bash experiments/demo/run.sh

# Beyond the paper: does the student recover clean representations or compensate for its one
# distortion? Every recipe x STUDY_SEEDS seeds from the demo's teacher -> experiments/study/results.md.
STUDY_SEEDS ?= 3
study: install fashion-mnist
	SEEDS=$(STUDY_SEEDS) FAST=$(FAST) bash experiments/study/run.sh

# ---------------------------------------------------------------------------------------------
# The paper's experiments. Each runs its sweep(s) through Hydra multirun, then distortkd-report.
# ARGS= is passed to every command, e.g. ARGS="trainer=ddp trainer.devices=8" or
# ARGS="data.path=/data/imagenet100 model.weights_file=/ckpt/dino_vitb16.safetensors".
# Finished runs are skipped and killed ones resume, so re-running a target is cheap.
RUNS ?= $(or $(DISTORTKD_RUNS),runs)
RESULTS ?= results
DISTILL := DISTORTKD_RUNS=$(RUNS) $(BIN)/distortkd-distill -m
FINETUNE := DISTORTKD_RUNS=$(RUNS) $(BIN)/distortkd-finetune -m
EVALUATE := DISTORTKD_RUNS=$(RUNS) $(BIN)/distortkd-evaluate -m
REPORT := $(BIN)/distortkd-report
# Contrastive Inversion cells. Its students train with its own recipe (optim=ci: Adam 3e-4, no weight
# decay, cosine stepped per epoch; distortkd/conf/optim/ci.yaml) and its symmetric InfoNCE (distortkd/conf/loss/contrastive.yaml);
# CI_OPTIM=distill trains them with ours instead (equal budget; use another RUNS= so both are kept).
# Fine-tuning follows the one protocol shared by every method (optim=finetune).
CI_OPTIM ?= ci
CI_ARGS := model=clip_rn101 loss=contrastive method=ci
CI_DISTILL_ARGS := $(CI_ARGS) optim=$(CI_OPTIM)

.PHONY: distill-table1 finetune-table1
distill-table1: install      # students for tables 1-2 and figures 2-4: ours and CI, 6 settings
	$(DISTILL) experiment=table1 $(ARGS)
	$(DISTILL) experiment=table1 $(CI_DISTILL_ARGS) $(ARGS)

finetune-table1: distill-table1
	$(FINETUNE) experiment=table1 method=ours,supervised $(ARGS)
	$(FINETUNE) experiment=table1 $(CI_ARGS) $(ARGS)

table1: finetune-table1      # Table 1: in-domain ImageNet-100
	$(REPORT) $(RUNS)/table1 --only table1 --out $(RESULTS)/table1

table2: distill-table1       # Table 2: transfer to CIFAR-10/100, STL-10, RESISC45, CAMELYON17
	$(FINETUNE) experiment=table2 method=ours,supervised $(ARGS)
	$(FINETUNE) experiment=table2 $(CI_ARGS) $(ARGS)
	$(REPORT) $(RUNS)/table2 --only table2 --out $(RESULTS)/table2

table3: install              # Table 3: loss ablation
	$(DISTILL) experiment=table3 $(ARGS)
	$(FINETUNE) experiment=table3 method=ours $(ARGS)
	$(REPORT) $(RUNS)/table3 --only table3 --out $(RESULTS)/table3

fig2: finetune-table1        # Figure 2: accuracy vs severity beyond training
	$(EVALUATE) experiment=fig2 method=ours,supervised $(ARGS)
	$(REPORT) $(RUNS)/table1 --only fig2 --out $(RESULTS)/fig2

fig3: distill-table1         # Figure 3: label fractions 0.5 % ... 100 %
	$(FINETUNE) experiment=fig3 method=ours,supervised $(ARGS)
	$(REPORT) $(RUNS)/fig3 --only fig3 --out $(RESULTS)/fig3

fig4: finetune-table1        # Figure 4: attention maps
	$(EVALUATE) experiment=fig4 $(ARGS)
	$(REPORT) $(RUNS)/fig4 --only fig4 --out $(RESULTS)/fig4

# Held-out corruptions: every corruption corruptions.heldout_suite has, regenerated on the fly; with
# BENCHMARK_PATH=<ImageNet-C folder> also the published files (BENCHMARK=cifar10c|cifar100c for the
# CIFAR folders, with ARGS picking fine-tunes on that data). mCE relative to Supervised and the
# benchmark's own (vs AlexNet), side by side.
BENCHMARK ?= imagenet_c
BENCHMARK_PATH ?=
comma := ,
heldout: finetune-table1     # beyond the paper: ImageNet-C style held-out corruptions, mCE
	$(EVALUATE) experiment=fig2 suite=heldout method=ours,supervised $(ARGS)
	$(if $(BENCHMARK_PATH),$(EVALUATE) experiment=fig2 suite=$(BENCHMARK) benchmark.path=$(BENCHMARK_PATH) method=ours$(comma)supervised $(ARGS))
	$(REPORT) $(RUNS)/table1 --only heldout,diagnostics --out $(RESULTS)/heldout

bench: install
	$(BIN)/distortkd-bench taps
	$(BIN)/distortkd-bench step --model vit_small_patch16_224 --batch 16
	$(BIN)/distortkd-bench distort

# One GPU, <= 8 min: ViT-B/16 distillation and supervised steps (bf16, eager and compiled, MFU, peak
# memory), the data path (PIL in 4/8/16 workers vs data.cache=uint8) and Lightning's overhead.
BENCH_OUT ?= $(RESULTS)/bench-gpu
bench-gpu: install
	$(BIN)/distortkd-bench gpu --out $(BENCH_OUT)

clean:
	rm -rf $(VENV) runs results experiments/demo/runs experiments/study/runs experiments/study/fast
