# ctpi — the user's interface. `make help` lists the targets.
SHELL := /bin/bash

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
CTPI    := $(VENV)/bin/ctpi
DATA    ?= ../shared/data/covid-ct ../shared/data/sarscov2-ct
ARCH    ?= mobilenetv2
WEIGHTS_mobilenetv2 := ../shared/weights/mobilenet_v2_1.0_224_imagenet_notop.weights.h5
WEIGHTS_resnet50    := ../shared/weights/resnet50_imagenet_c4.weights.h5
WEIGHTS ?= $(WEIGHTS_$(ARCH))
# one --data per source folder in DATA
DATA_ARGS = $(foreach folder,$(DATA),--data $(folder))
RUN     ?= runs/$(ARCH)
OUT     ?= models/$(ARCH)
SEEDS   ?=
TRAIN_ARGS ?=
# The recipe each shipped bundle was trained with (docs/models.md); RECIPE= gives python -m
# train's defaults (what WEIGHTS=none needs). MobileNetV2 in two runs: BACKBONE_RECIPE fine-tunes
# the network with one softmax head per source and its kernels on the int8 grid into
# RUN-backbone, then RECIPE fits a source gate and one linear expert per source on that
# backbone's stride-8 and stride-16 maps (blocks 6 and 13; and on their int8 version); ResNet50
# the same, its last three stage-4 blocks fine-tuned, the experts reading its two stage-4 maps only
# (the frozen early stages' 8-bit activations are what failed its int8). BACKBONE_RECIPE= skips
# the first run. The shipped heads (preprocessing v3) were refitted with the C and views their
# v2 runs chose (--experts-fixed, in each MODEL_CARD.md's command) so that the change of crop,
# not a new choice on 118 COVID-CT val slices, is what moved them; `make train` chooses afresh.
BACKBONE_RECIPE_mobilenetv2 := --head sources --snap-weights --head-epochs 3 --fine-epochs 24 --patience 7 --max-minutes 45
BACKBONE_RECIPE_resnet50    := --head sources --snap-weights --max-minutes 60
BACKBONE_RECIPE ?= $(BACKBONE_RECIPE_$(ARCH))
RECIPE_mobilenetv2 := --head experts --trunk-views 3 --int8-view --expert-layers block_6_expand_relu,block_13_expand_relu
RECIPE_resnet50    := --head experts --trunk-views 3 --int8-view --expert-layers conv4_block3_out,conv4_block6_out
RECIPE  ?= $(RECIPE_$(ARCH))
# ... and the formats each was converted to
FORMATS_mobilenetv2 := int8,float16,float32,onnx
FORMATS_resnet50    := int8,float16
FORMATS ?= $(FORMATS_$(ARCH))
# ... and int8 calibration slices (MobileNetV2's experts: 1,000 agree with Keras on 99.4 % of val with
# the head in float; full-integer, its head's joined features agreed on 94.5 % with 1,000, 97.4 % with 300)
CALIBRATION_mobilenetv2 := 1000
CALIBRATION_resnet50    := 300
CALIBRATION ?= $(CALIBRATION_$(ARCH))
# ... and int8's float fallback (convert/selective.py): MobileNetV2's head after the pooling in float
FALLBACK_mobilenetv2 := head
FALLBACK_resnet50    := auto
FALLBACK ?= $(FALLBACK_$(ARCH))
SSL     ?= runs/ssl-$(ARCH)
MODEL   ?= models/mobilenetv2
THREADS ?= 1,2
INBOX   ?= var/inbox
STATE   ?= var/state
HOST    ?= 127.0.0.1
PORT    ?= 8501
PI        ?=
PI_USER   ?=
PI_PORT   ?=
SSH_OPTS  ?=
EXTRAS    ?= ui
# what `make deploy` ships and where it stages (defaults: this tree, var/deploy)
SOURCE    ?=
DEPLOY_WORK ?=
INVENTORY ?= deploy/hosts.ini
# extra pytest arguments for make test, e.g. --no-skips (a skip fails; CI sets it) or -k NAME
PYTEST_ARGS ?=
# pytest-xdist workers for make test (0: one process); a test file stays on one worker
# (--dist loadfile), so a module's fixtures are built once and its fixed ports never collide
TEST_WORKERS ?= 2

.DEFAULT_GOAL := help
.PHONY: help run test lint train loso pretrain convert bench system-deps lock
.PHONY: deploy rollback deploy-fleet pi-emu

help: ## list the targets and their variables
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-14s %s\n", $$1, $$2}'
	@echo "  variables: DATA=$(DATA) ARCH=$(ARCH) WEIGHTS=$(WEIGHTS) SEEDS=$(SEEDS) RECIPE='$(RECIPE)' FORMATS=$(FORMATS) RUN=$(RUN) OUT=$(OUT) MODEL=$(MODEL) PI=$(PI) EXTRAS=$(EXTRAS) INVENTORY=$(INVENTORY)"

# One virtualenv, installed from pyproject.toml at the versions of this interpreter's desktop
# lock (requirements/desktop-cp<XY>-<machine>.txt, as pip constraints); a stamp per set of
# extras so `make run` installs only the device side and the UI, and `make test` everything.
# deploy.locks refuses a lock older than pyproject.toml's dependencies: run `make lock`.
$(VENV)/.stamp-%: pyproject.toml $(wildcard requirements/desktop-*.txt)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@lock=$$($(PY) -m deploy.locks desktop) && echo "$(PY) -m pip install -q -c $$lock -e '.[$*]'" && \
	  $(PY) -m pip install -q -c $$lock -e '.[$*]'
	@touch $@

# UPGRADE=1: every pin to the newest release pyproject.toml allows (else the pins stay where they can)
UPGRADE ?=
lock: ## write the version locks in requirements/ with uv (desktop: every extra; each Pi platform: device + ui)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@test -x $(VENV)/bin/uv || $(PY) -m pip install -q uv
	$(PY) -m deploy.locks compile $(if $(UPGRADE),--upgrade)

system-deps: ## install the system packages the tests use (Debian: chromium, openssh-server, systemd, dcmtk, orthanc)
	@bash tests/system-deps.sh

test: $(VENV)/.stamp-dev system-deps ## run the whole test suite (README command 2)
	$(PY) -m pytest $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile) $(PYTEST_ARGS)

lint: $(VENV)/.stamp-dev ## ruff
	$(VENV)/bin/ruff check device train convert deploy tests tools streamlit_app.py

run: $(VENV)/.stamp-ui ## start the appliance: watch daemon + UI on $(HOST):$(PORT) (README command 1)
	$(CTPI) run --model $(MODEL) --inbox $(INBOX) --state $(STATE) --host $(HOST) --port $(PORT)

# One run into $(1) with extra arguments $(2): RUN-backbone first when BACKBONE_RECIPE is set.
train_one = $(if $(strip $(BACKBONE_RECIPE)),$(PY) -m train --arch $(ARCH) $(DATA_ARGS) --weights $(WEIGHTS) --out $(1)-backbone $(2) $(BACKBONE_RECIPE) $(TRAIN_ARGS) && $(PY) -m train --arch $(ARCH) $(DATA_ARGS) --weights $(1)-backbone --out $(1) $(2) $(RECIPE) $(TRAIN_ARGS),$(PY) -m train --arch $(ARCH) $(DATA_ARGS) --weights $(WEIGHTS) --out $(1) $(2) $(RECIPE) $(TRAIN_ARGS))

train: $(VENV)/.stamp-train ## train ARCH on the DATA sources from WEIGHTS into RUN with the shipped bundle's BACKBONE_RECIPE (into RUN-backbone) and RECIPE (SEEDS="42 1 2": one run per seed, averaged into RUN)
ifeq ($(words $(SEEDS)),0)
	$(call train_one,$(RUN),)
else
	@set -e; for seed in $(SEEDS); do \
	  echo "== member seed $$seed -> $(RUN)-seed$$seed"; \
	  $(call train_one,$(RUN)-seed$$seed,--seed $$seed); \
	done
	$(PY) -m train.ensemble $(DATA_ARGS) --out $(RUN) --runs $(foreach seed,$(SEEDS),$(RUN)-seed$(seed))
endif

# make loso: the shipped recipe on each source alone. With a BACKBONE_RECIPE (MobileNetV2) each
# source first gets its own backbone run (LOSO/<source>-backbone), and its head starts from it.
LOSO ?= runs/loso-$(ARCH)
LOSO_REPORT_mobilenetv2 := docs/leave-one-source-out-shipped.md
LOSO_REPORT_resnet50    := docs/leave-one-source-out-experts.md
LOSO_REPORT ?= $(LOSO_REPORT_$(ARCH))
loso: $(VENV)/.stamp-train ## leave-one-source-out: ARCH's recipe trained on each DATA source alone, scored on every source's val (LOSO_REPORT)
	$(if $(strip $(BACKBONE_RECIPE)),for folder in $(DATA); do $(PY) -m train --arch $(ARCH) --data $$folder --weights $(WEIGHTS) --out $(LOSO)/$$(basename $$folder)-backbone $(BACKBONE_RECIPE) -q || exit 1; done)
	$(PY) -m train.loso --arch $(ARCH) $(DATA_ARGS) --weights $(if $(strip $(BACKBONE_RECIPE)),'$(LOSO)/{source}-backbone',$(WEIGHTS)) --out $(LOSO) --report $(LOSO_REPORT) --train-args "$(RECIPE) $(TRAIN_ARGS)"

pretrain: $(VENV)/.stamp-train ## self-supervised (SimCLR) pre-training of ARCH on the first DATA source's train/ from WEIGHTS into SSL (then: make train WEIGHTS=$(SSL)/backbone.weights.h5)
	$(PY) -m train.pretrain --arch $(ARCH) --data $(firstword $(DATA)) --weights $(WEIGHTS) --out $(SSL)

convert: $(VENV)/.stamp-convert ## convert training run RUN into bundle OUT in FORMATS (the shipped bundle's for ARCH) with the accuracy gate
	$(PY) -m convert --run $(RUN) $(DATA_ARGS) --out $(OUT) --name $(notdir $(OUT)) --formats $(FORMATS) --calibration-samples $(CALIBRATION) --float-fallback $(FALLBACK)

bench: $(VENV)/.stamp-onnx ## on-device benchmark of MODEL with THREADS
	$(CTPI) bench --model $(MODEL) --threads $(THREADS)

deploy: $(VENV)/.stamp-ui ## ship MODEL to Pi PI over ssh as a release; health check, auto-rollback (PI_USER PI_PORT SSH_OPTS EXTRAS SOURCE DEPLOY_WORK)
	$(PY) -m deploy.ship deploy --host "$(PI)" --user "$(PI_USER)" $(if $(PI_PORT),--port $(PI_PORT)) --ssh-options="$(SSH_OPTS)" --model "$(MODEL)" --extras "$(EXTRAS)" $(if $(SOURCE),--source "$(SOURCE)") $(if $(DEPLOY_WORK),--work "$(DEPLOY_WORK)")

rollback: $(VENV)/.stamp-ui ## switch Pi PI back to its previous release and health-check it
	$(PY) -m deploy.ship rollback --host "$(PI)" --user "$(PI_USER)" $(if $(PI_PORT),--port $(PI_PORT)) --ssh-options="$(SSH_OPTS)"

deploy-fleet: $(VENV)/.stamp-dev ## deploy MODEL to every Pi in INVENTORY with Ansible, one result line per Pi
	$(VENV)/bin/ansible-playbook -i "$(INVENTORY)" deploy/playbook.yml -e ctpi_model="$(abspath $(MODEL))" -e ctpi_extras="$(EXTRAS)"

pi-emu: $(VENV)/.stamp-dev ## make deploy of models/mobilenetv2 to an emulated Raspberry Pi OS arm64 (qemu; root, wheelhouse, venv cached in CTPI_PI_EMU_CACHE, default /var/cache/ctpi-pi-emu), health check, lost wheel and rollback there; as root
	$(PY) -m tests.pi_emu
