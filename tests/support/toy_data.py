"""Small deterministic datasets the training tests share."""
import numpy as np

CE = "sparse_categorical_crossentropy"


def blobs(n=60, features=3, classes=3, seed=0):
    """`n` examples of `classes` Gaussian blobs, shifted by 2 per class along every feature: easy to separate."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n).astype(np.int32)
    x = (rng.normal(size=(n, features)) + 2.0 * y[:, None]).astype(np.float32)
    return x, y
