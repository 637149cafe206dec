"""Test set-up: 8 CPU devices for the multi-device tests, set before JAX initializes."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The model zoos (tests/_zoo.py) build Hugging Face models from configs; never reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["JAX_NUM_CPU_DEVICES"] = os.environ.get("JAX_NUM_CPU_DEVICES", "8")
# On 2 cores the CPU client has one thread per simulated device; under load an 8-device
# collective can wait for threads far longer than XLA's default 40 s before aborting.
if "collective_call_terminate_timeout" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_collective_call_terminate_timeout_seconds=600"
  ).strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)
