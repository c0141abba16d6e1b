# The two commands a new user needs: `make pipeline` (set up, then `dvc repro` on the built-in
# dataset) and `make test` (set up, then the test suite). Both create .venv on first use.
# `make pipeline MESHES=DIR` runs the whole pipeline on the meshes in DIR (its top-level sub-folders
# are the categories) as the DVC experiment named after DIR, in .shapeflow/experiments/<name>; this
# workspace stays the built-in run. A second run redoes only what changed (fetch rereads DIR).
# SET="train_vae.family=grid train_vae.steps=4000" adds param overrides (the name gains their hash).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup pipeline test test-fast lint bench clean-venv services stop-services deploy exps gpu-check

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

pipeline: setup
ifdef MESHES
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m shapeflow.dvc_pipeline "$(MESHES)" $(foreach s,$(SET),--set '$(s)')
else
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro
endif

# Two test processes (pytest-xdist, a module per process), each torch process on one thread: on the
# 2-core CI machine two processes with two threads each would spin against each other.
test: lint
	OMP_NUM_THREADS=1 SHAPEFLOW_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile

# For developers: the suite without the tests marked slow (subprocess trainings, real services).
test-fast: lint
	OMP_NUM_THREADS=1 SHAPEFLOW_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Benchmarks need the dense baseline's distance library (pysdf), which compiles against Eigen
# (Debian/Ubuntu: apt-get install libeigen3-dev).
bench: setup
	CPATH=/usr/include/eigen3 $(BIN)/python -m pip install --quiet -c constraints.txt -e ".[bench]"
	$(BIN)/python bench/bench_watertight.py
	$(BIN)/python bench/bench_salient.py
	$(BIN)/python bench/bench_vae.py
	$(BIN)/python bench/bench_dit.py
	$(BIN)/python bench/bench_decode.py

# On a CUDA machine (with your CUDA build of torch in the venv): what the stages pick there (bf16,
# the attention kernels, decoding on the GPU) checked against float32 and the CPU.
gpu-check: setup
	$(BIN)/python bench/gpu_check.py

# Prefect server (127.0.0.1:4200), MLflow server (127.0.0.1:5000) and a worker on the `shapeflow` process
# pool; logs and pid files in .shapeflow/services. `make deploy` registers prefect.yaml's deployments
# and the automation that schedules a crashed run again (flows/automations.py).
services: setup
	scripts/services.sh start

stop-services:
	scripts/services.sh stop

deploy: setup
	eval "$$(scripts/services.sh env)" && SHAPEFLOW_REPO="$(CURDIR)" $(BIN)/prefect --no-prompt deploy --all
	eval "$$(scripts/services.sh env)" && $(BIN)/python flows/automations.py

# `dvc exp show` narrowed to the headline figures and the most changed params, so it fits a terminal
# (the full table has a column for every param and metric). EXP_KEEP replaces the column set (regexes
# of column names); EXP_ARGS passes more options, e.g. EXP_ARGS="--rev 5cb712b" or "-A".
EXP_KEEP ?= Experiment|recon\.f@0\.02$$|recon\.cd$$|generation\.mmd_cd$$|generation\.category_match_common$$|train_vae\.steps$$|train_dit\.steps$$
exps: setup
	$(BIN)/dvc exp show --drop '.*' --keep '$(EXP_KEEP)' $(EXP_ARGS)

clean-venv:
	rm -rf $(VENV)
