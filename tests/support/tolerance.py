"""The suite's one tolerance policy: how far two float32 results may differ and still be "the same".

Float32 results move between machines in their last bits: XLA:CPU and the
kernels it calls pick code by the processor (vector width, FMA contraction,
reduction order), and GPUs multiply in TF32 unless told otherwise (the parity
tests pin `jax.default_matmul_precision("highest")`). So every comparison in
the suite names one entry below, and every entry says where its number comes
from: float32's machine epsilon scaled by the work done, and at least 10x the
largest difference measured on our machines (the session summary prints each
comparison kind's largest difference against its tolerance: `margins`).

Trained metrics are not compared here: a seeded run ends elsewhere on another
processor, so they are asserted as bands that hold for five seeds, in
`tests/project/test_seed_bands.py`: each band is what seeds 0-4 gave, widened by
about one test example, with the seeds' values written beside it. Those tests
train five times, so they are marked `slow`: `make test` leaves them out
(pytest's addopts `-m 'not slow'`) and `make bands` runs them. The fast tests
train one seed and assert against the same band, their margin stated beside
the assertion (e.g. the bfloat16 digits CNN in `tests/training/test_precision.py`).
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7: one rounding of a float32 number near 1


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """`|actual - desired| <= atol + rtol * |desired|`, element-wise (numpy's `assert_allclose`)."""

    kind: str
    rtol: float
    atol: float


# One float32 operation or a short reduction (a loss over a few logits, a jitted function against
# numpy): FMA contraction and a reordered sum change a result by a few roundings. 8 eps covers
# 8 roundings; the largest seen here is 1 eps (1.19e-7).
ONE_OP = Tolerance("one op", rtol=8 * EPS32, atol=8 * EPS32)

# A few dozen operations on numbers of order 1 (a train step of a small network, the same epoch as a
# scan and as separate calls, masked padding against the real examples): roundings add up to about
# sqrt(ops) eps, and a step's update multiplies them by the learning rate. 1e-5 relative is ~80 eps,
# over 10x above the largest seen here (4.8e-7, see `margins`).
FEW_OPS = Tolerance("a few ops", rtol=1e-5, atol=1e-6)


# The same training steps with the batch split over 4 devices and on 1: each device sums its part of
# the gradient and the parts are then added, another order of the same sums; a few roundings per step,
# as FEW_OPS. Seen here after 2 epochs (10 Adam steps): 6e-8 on parameters, 2.4e-7 on losses.
DATA_PARALLEL = Tolerance("data-parallel vs one device", rtol=1e-5, atol=1e-6)


# A float32 train step's gradient against a float64 central difference (step 1e-6) of the same loss:
# the float32 gradient sums ~30 terms of order 1 (8 examples x 4 units), so ~30 eps = 4e-6 of rounding;
# the float64 difference quotient adds h^2 truncation, negligible. 2e-5 is 5x that bound.
GRADIENT_AGAINST_FLOAT64 = Tolerance("gradient vs float64", rtol=0.0, atol=2e-5)


EPS16 = float(np.finfo(np.float16).eps)  # 9.77e-4: one rounding of a float16 number near 1


def float16_update(magnitude: float) -> Tolerance:
    """A float16 train step's update (loss-scaled, then unscaled) against the float32 step's, same start.

    float16 keeps 11 bits (eps16 = 9.8e-4, 8200x float32's): the step rounds its activations and
    their gradients to float16 through about a dozen operations in sequence (input cast, matmul,
    ReLU, logits, and back), while the scale, a power of two, cancels exactly. 16 eps16 relative
    to the update's largest entry (`magnitude`) is 14x the largest difference seen here (1.1 eps16:
    a 2-layer MLP on 16 examples, SGD with rate 1); an update never unscaled is 2^15 times too large.
    """
    return Tolerance("float16 step vs float32 step", rtol=0.0, atol=16 * EPS16 * magnitude)


def reordered_sums(terms: int, magnitude: float) -> Tolerance:
    """Float32 sums of `terms` products of size up to `magnitude`, added in another order (a convolution's
    kernel gradient summed per kernel offset rather than by XLA's kernel, against a float64 sum).

    Each addition rounds relative to the running sum, which can reach `terms * magnitude` before it cancels,
    so entries far smaller than the others carry their absolute error: random-walk rounding gives about
    `sqrt(terms) * eps * magnitude`; x4 for the products' own roundings and the largest of many entries.
    Seen here (288 terms of up to ~4): 7.4e-6 against 2.4e-4.
    """
    return Tolerance(f"reordered sums ({terms} terms)", rtol=0.0, atol=4 * terms ** 0.5 * magnitude * EPS32)


def deep_network(depth: int, magnitude: float) -> Tolerance:
    """Outputs of `depth` layers in sequence whose values reach `magnitude` (logits, features).

    Each layer adds a few roundings relative to the values it carries, and
    errors can add up along the layers: `depth * magnitude * eps` bounds the
    absolute error in the worst case; x4 for the few roundings inside a layer
    (a conv's sum, BatchNorm, the activation). MobileNetV2 (53 layers) with
    logits up to 20: 5.0e-4. Seen here: below 1e-5, so over 10x of margin.
    """
    return Tolerance(f"deep network ({depth} layers)", rtol=0.0, atol=4 * depth * magnitude * EPS32)


def probabilities(depth: int, logit_range: float) -> Tolerance:
    """Softmax outputs of a `depth`-layer network whose logits span `logit_range`.

    A softmax's Jacobian has norm at most 1/2, so a logit error of `d` moves a
    probability by at most `d / 2`; `d` is `deep_network`'s bound. MobileNetV2
    with logits spanning 20: 2.5e-4 absolute, and 1e-5 relative for the large
    probabilities the tests rank by.
    """
    return Tolerance(f"probabilities ({depth} layers)", rtol=1e-5,
                     atol=deep_network(depth, logit_range).atol / 2)


# The same network in another framework (Keras 3, torch): the mission's parity bar is 1e-5 on
# probabilities. Each framework orders its sums its own way (im2col, Winograd, oneDNN), so the
# difference is that of a deep network; seen here: 1e-6 or less (see `margins`).
CROSS_FRAMEWORK_PROBABILITIES = Tolerance("another framework, probabilities", rtol=0.0, atol=1e-5)


def cross_framework_activations(magnitude: float) -> Tolerance:
    """A block's output in another framework: 1e-5 relative to the block's largest value, at most 1e-4."""
    return Tolerance("another framework, activations", rtol=0.0, atol=min(1e-4, 1e-5 * max(magnitude, 1.0)))


# Per kind of comparison, the tightest one of this session: its |difference| and the tolerance it was
# checked against, where their ratio was smallest. Printed by conftest at the end of the run, so the
# margins can be read off any machine.
margins: dict[str, tuple[float, float]] = {}


def record(kind: str, difference: float, allowed: float) -> None:
    """Keeps, for `kind`, the comparison that came closest to its tolerance."""
    def room(entry):
        seen, limit = entry
        return limit / seen if seen else float("inf")

    entry = (float(difference), float(allowed))  # plain floats: sent between processes as JSON
    if kind not in margins or room(entry) < room(margins[kind]):
        margins[kind] = entry


def assert_close(actual, desired, tolerance: Tolerance, err_msg: str = "") -> None:
    """`np.testing.assert_allclose` with `tolerance`, for arrays or matching pytrees of arrays."""
    def compare(a, d):
        a, d = np.asarray(a, np.float64), np.asarray(d, np.float64)
        if a.size:  # the allowance at the largest value compared, for the margins table
            record(tolerance.kind, float(np.max(np.abs(a - d))),
                    tolerance.atol + tolerance.rtol * float(np.max(np.abs(d))))
        np.testing.assert_allclose(a, d, rtol=tolerance.rtol, atol=tolerance.atol,
                                   err_msg=f"{err_msg} [{tolerance.kind}]")

    jax.tree.map(compare, actual, desired)
