import os

# Keras (a test-only reference) must run on the JAX backend; set before any import of keras.
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def jaxdl_cache(tmp_path_factory):
    """A private cache for converted weights, shared by the tests of one session (and their subprocesses)."""
    path = tmp_path_factory.mktemp("jaxdl-cache")
    os.environ["JAXDL_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def imagenet_classifier(jaxdl_cache):
    from jaxdl.classifier import ImageClassifier

    return ImageClassifier.load("imagenet")
