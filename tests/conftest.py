"""Test-wide setup: quiet TensorFlow, keep it off accelerators, and fix JAX to CPU float32."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
