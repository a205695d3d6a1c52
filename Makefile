# normkit: the commands a person runs. Each target installs what is missing first.
PYTHON      ?= /usr/bin/python3
BUILD_DIR   ?= build
JOBS        ?= $(shell nproc)
CMAKE_FLAGS ?=

.PHONY: deps configure build test bench bench-distributed demo lab clean sanitize fuzz clang tsan

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

# Data-parallel training steps, one process vs 2 ranks with and without
# synchronized batch norm (bench/distributed_bench.cpp, about 2 minutes);
# JSON in $(BUILD_DIR)/bench/distributed.json. --bind-to none: the one-process
# arm uses every core; OpenMPI refuses root without the two variables.
bench-distributed: configure
	@cmake --build $(BUILD_DIR) -j $(JOBS) --target normkit_distributed_bench
	@OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun --oversubscribe --bind-to none \
	  -np 2 $(BUILD_DIR)/bench/normkit_distributed_bench --json $(BUILD_DIR)/bench/distributed.json

# The main job: cnn-small on Fashion-MNIST with and without batch normalization,
# 2 epochs each (SGD momentum 0.9, lr 0.05, batch 128); table on stdout, then
# runs/demo/report.md, curves.png (the training loss every 20 steps, the test
# metrics per epoch) and each run's metrics.jsonl, steps.jsonl and checkpoint.
# (The BN kernel demo that `make demo` used to run is still built: $(BUILD_DIR)/bn_demo.)
DEMO_OUT ?= runs/demo
demo: build
	@$(BUILD_DIR)/normkit compare --model cnn-small --epochs 2 --batch-size 128 --optimizer sgd \
	  --lr 0.05 --momentum 0.9 --seed 1 --log-every 20 --out $(DEMO_OUT) --overwrite

# The claims lab: every experiment of experiments/ at its default tier (about
# half an hour on 2 cores), then runs/lab/LAB.md and runs/lab/lab.html. Runs
# already finished in runs/lab are kept: an interrupted `make lab` resumes.
LAB_OUT ?= runs/lab
lab: build
	@$(BUILD_DIR)/normkit lab run all --out $(LAB_OUT)

# The second compiler: clang 14, optimized as the normal build, every test (but
# normkit.torch's: clang 14 cannot compile libtorch 1.13's headers as C++20, so a
# clang build has no PyTorch extension; python/CMakeLists.txt).
CLANG       ?= clang++-14
CLANG_DIR   ?= build-clang
clang: deps
	@cmake -S . -B $(CLANG_DIR) -G Ninja -DCMAKE_CXX_COMPILER=$(CLANG) -DPython3_EXECUTABLE=$(PYTHON) \
	  -DNORMKIT_BUILD_BENCH=OFF $(CMAKE_FLAGS) >/dev/null
	@cmake --build $(CLANG_DIR) -j $(JOBS)
	@cd $(CLANG_DIR) && ctest --output-on-failure -j $(JOBS)

# AddressSanitizer + UndefinedBehaviorSanitizer (clang, cmake/sanitizers.cmake) in
# its own build directory: the C++ tests, the CLI tests, the Python tests (the runtime
# preloaded; not normkit.torch's, as in `make clang`), the find_package consumer and
# the fuzz corpus replays. Any report fails.
# Not the lab's tests (label lab): ~60 training runs of the CLI that cli_tests already
# covers, several minutes under ASan; nor the pip install (label package: a build of its
# own, uninstrumented); SANITIZE_CTEST_FLAGS= runs them too. No documentation test: a
# clang build has no normkit.torch, which the examples use. This build is also CI's
# clang 14 build (.ci/run): `make clang` (uninstrumented) is for speed comparisons.
SANITIZE_DIR ?= build-sanitize
SANITIZE_CONFIGURE = cmake -S . -B $(SANITIZE_DIR) -G Ninja -DCMAKE_CXX_COMPILER=$(CLANG) \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DNORMKIT_SANITIZE=address,undefined -DNORMKIT_BUILD_FUZZERS=ON \
  -DNORMKIT_BUILD_BENCH=OFF -DPython3_EXECUTABLE=$(PYTHON) $(CMAKE_FLAGS) >/dev/null
SANITIZE_CTEST_FLAGS ?= -LE "lab|package"
sanitize: deps
	@$(SANITIZE_CONFIGURE)
	@cmake --build $(SANITIZE_DIR) -j $(JOBS)
	@cd $(SANITIZE_DIR) && UBSAN_OPTIONS=print_stacktrace=1 ctest --output-on-failure -j $(JOBS) \
	  $(SANITIZE_CTEST_FLAGS)

# ThreadSanitizer on the kernel tests (the threaded code: OpenMP in the kernels). Clang's
# OpenMP runtime with its TSan annotations (libarcher), which make TSan understand
# OpenMP's barriers and reductions; without them it reports the runtime's own synchronization.
TSAN_DIR    ?= build-tsan
ARCHER      ?= /usr/lib/llvm-14/lib/libarcher.so
tsan: deps
	@cmake -S . -B $(TSAN_DIR) -G Ninja -DCMAKE_CXX_COMPILER=$(CLANG) -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	  -DNORMKIT_SANITIZE=thread -DNORMKIT_BUILD_PYTHON=OFF -DNORMKIT_BUILD_BENCH=OFF $(CMAKE_FLAGS) >/dev/null
	@cmake --build $(TSAN_DIR) -j $(JOBS) --target normkit_tests
	@OMP_TOOL_LIBRARIES=$(ARCHER) OMP_NUM_THREADS=$(or $(TSAN_THREADS),4) TSAN_OPTIONS=halt_on_error=1 \
	  $(TSAN_DIR)/tests/cpp/normkit_tests --gtest_brief=1

# libFuzzer on every parser of outside bytes, FUZZ_SECONDS per target, one after
# another (fuzz/run.sh; FUZZ_TARGETS="spec csv" for some). Builds in the sanitizer directory.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= checkpoint spec csv idx standardizer
fuzz: deps
	@$(SANITIZE_CONFIGURE)
	@cmake --build $(SANITIZE_DIR) -j $(JOBS) --target $(addprefix fuzz_,$(FUZZ_TARGETS))
	@bash fuzz/run.sh $(SANITIZE_DIR) $(FUZZ_SECONDS) $(FUZZ_TARGETS)

clean:
	@rm -rf $(BUILD_DIR) $(CLANG_DIR) $(SANITIZE_DIR) $(TSAN_DIR)
