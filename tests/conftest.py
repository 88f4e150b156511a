"""Test set-up: 8 fake CPU devices and JAX's persistent compilation cache."""
import os

# Sharded code is tested against one device on 8 fake CPU devices; set before jax loads.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("JAXREG_JAX_CACHE", os.path.expanduser("~/.cache/jaxreg/jax")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
