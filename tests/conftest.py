"""Test set-up: 8 forced CPU devices (so pmap and collectives run).

`make test` sets JAX_COMPILATION_CACHE_DIR (JAX reads it; subprocesses inherit it), so a program compiled by one
worker or trainer subprocess is read back by the others instead of compiled again (Makefile: TEST_JAX_CACHE).
A plain `pytest` runs without it, unless the variable is set.
"""
import os
import warnings

# Must happen before jax is imported anywhere; subprocesses of the tests inherit it. Compilation dominates the
# suite: LLVM optimisation level 1 (default 2) compiles faster, and the few longer runs lose less than that at
# run time (docs/results.md, Set-up commands: the suite's times).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

warnings.filterwarnings("ignore", message=".*JAXopt is no longer maintained.*")
