# normkit: the commands a person runs. Each target installs what is missing first.
PYTHON      ?= /usr/bin/python3
BUILD_DIR   ?= build
JOBS        ?= $(shell nproc)
CMAKE_FLAGS ?=

.PHONY: deps configure build test bench demo clean

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

demo: build
	@$(BUILD_DIR)/bn_demo

clean:
	@rm -rf $(BUILD_DIR)
