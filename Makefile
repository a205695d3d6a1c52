# normkit: the commands a person runs. Each target installs what is missing first.
PYTHON      ?= /usr/bin/python3
BUILD_DIR   ?= build
JOBS        ?= $(shell nproc)
CMAKE_FLAGS ?=

.PHONY: deps configure build test bench demo lab clean

deps:
	@bash scripts/install-deps.sh

configure: deps
	@cmake -S . -B $(BUILD_DIR) -G Ninja -DPython3_EXECUTABLE=$(PYTHON) $(CMAKE_FLAGS) >/dev/null

build: configure
	@cmake --build $(BUILD_DIR) -j $(JOBS)

test: build
	@cd $(BUILD_DIR) && ctest --output-on-failure -j $(JOBS)

bench: configure
	@cmake --build $(BUILD_DIR) -j $(JOBS) --target normkit_bench
	@$(BUILD_DIR)/bench/normkit_bench

# The main job: cnn-small on Fashion-MNIST with and without batch normalization,
# 2 epochs each (SGD momentum 0.9, lr 0.05, batch 128); table on stdout, then
# runs/demo/report.md, curves.png and each run's metrics.jsonl and checkpoint.
# (The BN kernel demo that `make demo` used to run is still built: $(BUILD_DIR)/bn_demo.)
DEMO_OUT ?= runs/demo
demo: build
	@$(BUILD_DIR)/normkit compare --model cnn-small --epochs 2 --batch-size 128 --optimizer sgd \
	  --lr 0.05 --momentum 0.9 --seed 1 --out $(DEMO_OUT) --overwrite

# The claims lab: every experiment of experiments/ at its default tier (about
# half an hour on 2 cores), then runs/lab/LAB.md and runs/lab/lab.html. Runs
# already finished in runs/lab are kept: an interrupted `make lab` resumes.
LAB_OUT ?= runs/lab
lab: build
	@$(BUILD_DIR)/normkit lab run all --out $(LAB_OUT)

clean:
	@rm -rf $(BUILD_DIR)
