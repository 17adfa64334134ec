"""Test set-up: 8 forced CPU devices (so pmap and collectives run) and a persistent compile cache."""
import os
import warnings

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

_CACHE = os.path.join(os.path.dirname(__file__), os.pardir, ".cache", "jax_compilation")
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
warnings.filterwarnings("ignore", message=".*JAXopt is no longer maintained.*")
