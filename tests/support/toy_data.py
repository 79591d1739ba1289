"""Small deterministic datasets and models the training tests share."""
import numpy as np
from flax import nnx

CE = "sparse_categorical_crossentropy"


def blobs(n=60, features=3, classes=3, seed=0):
    """`n` examples of `classes` Gaussian blobs, shifted by 2 per class along every feature: easy to separate."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n).astype(np.int32)
    x = (rng.normal(size=(n, features)) + 2.0 * y[:, None]).astype(np.float32)
    return x, y


class NNXNet(nnx.Module):
    """Linear -> BatchNorm -> ReLU -> Dropout -> Linear, a Flax NNX module with every kind of variable NNX carries;
    here rather than in a test, so that a run killed in a child process resumes in the test's process with the
    same class."""

    def __init__(self, rngs: nnx.Rngs, features: int = 3, classes: int = 3):
        self.hidden = nnx.Linear(features, 8, rngs=rngs)
        self.norm = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.out = nnx.Linear(8, classes, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(nnx.relu(self.norm(self.hidden(x)))))
