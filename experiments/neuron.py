"""One neuron and XOR: the forward pass computed by hand in the tutorial, as Flax Dense layers.

A ReLU neuron with inputs (0, 0.5, 1), weights (-1, -0.5, 0.5) and bias 1
outputs 1.25. Two hidden ReLU units h1 = relu(x1 + x2), h2 = relu(x1 + x2 - 1)
and the output relu(h1 - 2 h2) compute XOR.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from experiments.common import Check, finish, parser, run_dir

CHECKS = (
    Check("neuron_output", "1.25", lambda v: v == 1.25),
    Check("xor", "0 1 1 0", lambda v: v == [0.0, 1.0, 1.0, 0.0]),
)


class ReluLayer(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Dense(self.features)(x))


class XorNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return ReluLayer(1, name="output")(ReluLayer(2, name="hidden")(x))


def neuron_output() -> float:
    params = {"Dense_0": {"kernel": jnp.array([[-1.0], [-0.5], [0.5]]), "bias": jnp.array([1.0])}}
    return float(ReluLayer(1).apply({"params": params}, jnp.array([[0.0, 0.5, 1.0]]))[0, 0])


def xor_outputs() -> list[float]:
    params = {
        "hidden": {"Dense_0": {"kernel": jnp.array([[1.0, 1.0], [1.0, 1.0]]), "bias": jnp.array([0.0, -1.0])}},
        "output": {"Dense_0": {"kernel": jnp.array([[1.0], [-2.0]]), "bias": jnp.array([0.0])}},
    }
    inputs = jnp.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    return [float(v) for v in np.asarray(XorNet().apply({"params": params}, inputs))[:, 0]]


def run(argv=None) -> dict:
    args = parser(__doc__, trains=False).parse_args(argv)
    return finish(run_dir("neuron", args.out), {"neuron_output": neuron_output(), "xor": xor_outputs()})


if __name__ == "__main__":
    run()
