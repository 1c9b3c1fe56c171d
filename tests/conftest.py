"""Test setup: 8 fake CPU devices (for mesh tests) before JAX's backend starts."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
