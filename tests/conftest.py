import os

# Keras (a test-only reference) must run on the JAX backend; set before any import of keras.
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
