"""Test set-up: 8 forced CPU devices (so pmap and collectives run).

No persistent compilation cache unless JAX_COMPILATION_CACHE_DIR is set (JAX reads it; subprocesses inherit it):
writing an executable to it segfaulted once in a full run (in XLA's executable serialisation, jax 0.10.2 on
CPU), which loses the whole run. For repeated local runs:
  JAX_COMPILATION_CACHE_DIR=.cache/jax_compilation make test
"""
import os
import warnings

# Must happen before jax is imported anywhere; subprocesses of the tests inherit it. Compilation dominates the
# suite: LLVM optimisation level 1 (default 2) compiles faster, and the few longer runs lose less than that at
# run time (README, Set-up commands: the suite's times).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

warnings.filterwarnings("ignore", message=".*JAXopt is no longer maintained.*")
