# The two commands a user needs: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NATIVE_STAMP := $(VENV)/.native

.PHONY: demo test test-slow test-all lint native bench bench-gpu gpu-carry gpu-carry-toy fuzz clean

$(STAMP): requirements-dev.txt requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

$(NATIVE_STAMP): $(STAMP) pyproject.toml CMakeLists.txt $(wildcard csrc/*)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

native: $(NATIVE_STAMP)

demo: $(NATIVE_STAMP)
	$(VENV)/bin/pure-fast demo --out-dir demo_out

# extra pytest arguments, e.g. make test PYTEST_ARGS="--runslow --durations=20" (what .ci/run does)
PYTEST_ARGS ?=
test: $(NATIVE_STAMP)
	$(PY) -m pytest -x tests $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check pure_fast tests bench

test-slow: $(NATIVE_STAMP)
	$(PY) -m pytest -x tests --runslow

bench: $(NATIVE_STAMP)
	$(PY) bench/run_all.py --device cpu

bench-gpu: $(NATIVE_STAMP)
	$(PY) bench/run_all.py --device cuda

# before a session with a lent GPU machine (no registry there): the wheels it lacks, into .gpu_carry/;
# then run `bash bench/gpu/session.sh checks` and `... end_to_end` there with .gpu_carry carried (bench/README.md)
gpu-carry: $(STAMP)
	PY=$(PY) sh bench/gpu/fetch_carry.sh

# before a GPU session that trains the v2 toy model: the diffusers wheel + MiniLM in fp16 into .gpu_carry_toy/;
# then `bash bench/gpu/session.sh train_toy_v2` there with .gpu_carry_toy carried (pure_fast/toy/v2/README.md)
gpu-carry-toy: $(STAMP)
	PY=$(PY) sh bench/gpu/fetch_carry_toy.sh

# bounded fuzzing of the native CSR reader (libFuzzer + ASan/UBSan with clang, else a g++ driver); not in `make test`
FUZZ_SECONDS ?= 60
fuzz:
	sh csrc/fuzz/run.sh $(FUZZ_SECONDS)

clean:
	rm -rf build pure_fast/_C*.so $(NATIVE_STAMP)
