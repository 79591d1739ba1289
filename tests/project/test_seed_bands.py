"""Five-seed bands: trained metrics that the fast tests check at one seed, here for seeds 0-4 (slow: `make bands`).

A seeded run lands elsewhere on another processor (see `tests/support/tolerance.py`),
so a trained metric is not compared with a number from one run: each test
here trains with seeds 0-4 and asserts that every seed lands in a band. The
band is what seeds 0-4 gave on our machine (AMD EPYC, 2 cores, jax 0.10.2,
the suite's XLA flags), widened by about one test example on each side,
written next to it with the seeds' values. The fast single-seed tests assert
against the same band, with their margin stated where they assert.

These tests are marked `slow`, so `make test` (pytest's `-m 'not slow'`)
leaves them out; `make bands` runs them (265 s with 2 workers at load 7 on
2 cores; the transfer bands need the cat photos in ../shared/data/cats).
"""
import optax
import pytest

from tests.support.toy_data import CE

SEEDS = (0, 1, 2, 3, 4)

pytestmark = pytest.mark.slow


def penguins_test_accuracy(seed: int, out) -> float:
    from experiments import penguins

    return penguins.run(["--quiet", "--out", str(out), "--seed", str(seed)])["test_accuracy"]


def transfer_accuracies(seed: int, out) -> dict:
    from experiments import transfer

    metrics = transfer.run(["--quiet", "--out", str(out), "--seed", str(seed)])
    assert metrics["stand_in"] is False
    return {name: metrics[name] for name in ("train_accuracy_all", "train_accuracy", "val_accuracy")}


def digits_cnn_accuracies(seed: int) -> dict:
    """The digits CNN trained 20 epochs in float32 and in bfloat16 from `seed` (split and initialisation), as
    `tests/training/test_precision.py` trains it for seed 0: {precision: test accuracy} and the test split's size."""
    from experiments.digits import CNN_LAYERS, load_split
    from jaxdl import ConvNet, evaluate, fit

    (x_train, y_train), _, (x_test, y_test) = load_split(seed)
    accuracy = {}
    for precision in ("float32", "bfloat16"):
        state, _ = fit(ConvNet(layers=CNN_LAYERS), x_train, y_train, loss=CE, optimizer=optax.adam(1e-3),
                       epochs=20, batch_size=32, seed=seed, precision=None if precision == "float32" else precision,
                       verbose=0)
        accuracy[precision] = float(evaluate(state, x_test, y_test, loss=CE)["accuracy"])
    return {**accuracy, "test_samples": len(y_test)}


def examples_right(accuracy: float, total: int) -> int:
    """An accuracy over `total` examples as the whole number of examples it counts (exact: k / total rounds back)."""
    count = round(accuracy * total)
    assert abs(count / total - accuracy) < 1e-9, (accuracy, total)
    return count


# Penguins, standardized, 100 epochs (experiments.penguins; the seed also draws the 80/20 split): seeds 0-4 gave
# 67, 68, 68, 67 and 69 of the 69 test penguins (0.971, 0.986, 0.986, 0.971, 1.0). Band: 66..69 of 69 (0.957..1.0),
# one penguin below the lowest seed. The fast test (test_experiments' penguins run, seed 0: 67/69) asserts
# >= 0.95, which admits 66/69 and no fewer: the band's low edge, one penguin under seed 0.
PENGUINS_BAND = (66, 69)


@pytest.mark.parametrize("seed", SEEDS)
def test_penguins_test_accuracy_band(tmp_path, seed):
    """Seen failing with `experiments.penguins.standardize` returning the raw features (seed 0: 23/69), then
    passing on the real code."""
    right = examples_right(penguins_test_accuracy(seed, tmp_path), 69)
    assert PENGUINS_BAND[0] <= right <= PENGUINS_BAND[1], f"seed {seed}: {right}/69 outside {PENGUINS_BAND}"


# Transfer learning on the 40 cat photos (experiments.transfer, Adam 1e-3, batch 16, 20 epochs): seeds 0-4 gave
#   validation (10 photos, f16-f20 + m16-m20): 6, 5, 6, 7, 5 right (0.6, 0.5, 0.6, 0.7, 0.5);
#   training on all 40: 40, 39, 39, 40, 38 (1.0, 0.975, 0.975, 1.0, 0.95);
#   training on the 30: 30, 29, 30, 30, 30 (1.0, 0.967, 1.0, 1.0, 1.0).
# Bands, one photo beyond the seeds on each side: validation 4..8 of 10, all 40: 37..40, the 30: 28..30. The
# experiment's checks (val_accuracy <= 0.8, training >= 0.9) sit at the validation band's top edge, one photo above
# the highest seed (seed 0: two photos below it), and below the training bands.
TRANSFER_BANDS = {"val_accuracy": (10, 4, 8), "train_accuracy_all": (40, 37, 40), "train_accuracy": (30, 28, 30)}


@pytest.mark.requires_cats
@pytest.mark.parametrize("seed", SEEDS)
def test_transfer_accuracy_bands(tmp_path, jaxdl_cache, seed):
    """Seen failing with `experiments.transfer` validating on its training photos (validation 10/10 for seed 0,
    outside 4..8), then passing on the real code."""
    accuracies = transfer_accuracies(seed, tmp_path)
    for name, (total, low, high) in TRANSFER_BANDS.items():
        right = examples_right(accuracies[name], total)
        assert low <= right <= high, f"seed {seed}: {name} {right}/{total} outside {low}..{high}"


# The digits CNN (experiments.digits' layers, Adam 1e-3, batch 32, 20 epochs; the seed draws the split and the
# initialisation), in float32 and in bfloat16 with the same seed: of the 360 test digits, seeds 0-4 gave
#   float32:  352, 355, 350, 357, 351 (0.978, 0.986, 0.972, 0.992, 0.975);
#   bfloat16: 353, 357, 351, 355, 349; bfloat16 minus float32: +1, +2, +1, -2, -2 digits.
# Bands: float32 349..360 (one digit below the lowest seed); |bfloat16 - float32| <= 3 digits (one beyond the
# largest). The fast test (tests/training/test_precision.py, seed 0: +1) asserts the same 3 digits (0.01 of 360 = 3.6).
DIGITS_FLOAT32_BAND = (349, 360)
BFLOAT16_GAP_BAND = 3


@pytest.mark.parametrize("seed", SEEDS)
def test_bfloat16_digits_cnn_gap_band(seed):
    """Seen failing with a bfloat16 train step that divides the gradients by a loss scale of 2^24 it never multiplied
    in (seed 0: bfloat16 169/360 against float32 352), then passing on the real code. Not caught, as bfloat16
    training shrugs them off: the parameters rounded to bfloat16 after each update, the loss computed in bfloat16,
    and gradients divided by 2^15 (Adam is nearly invariant to their scale)."""
    accuracies = digits_cnn_accuracies(seed)
    total = accuracies["test_samples"]
    float32, bfloat16 = (examples_right(accuracies[name], total) for name in ("float32", "bfloat16"))
    assert total == 360
    assert DIGITS_FLOAT32_BAND[0] <= float32 <= DIGITS_FLOAT32_BAND[1], f"seed {seed}: float32 {float32}/360"
    assert abs(bfloat16 - float32) <= BFLOAT16_GAP_BAND, f"seed {seed}: bfloat16 {bfloat16} vs float32 {float32}"


@pytest.mark.requires_mnist
@pytest.mark.parametrize("seed", SEEDS)
def test_flax_nnx_tutorials_cnn_band_on_the_real_mnist(tmp_path, seed):
    """Flax's NNX MNIST tutorial's CNN, its recipe (AdamW 0.005, b1 0.9, batch 32), one epoch of the 60,000
    images through `fit` (`python -m experiments.mnist --models nnx_cnn`): test accuracy in
    `experiments.mnist.BANDS[("nnx_cnn", 1)]`, the band measured over these seeds."""
    from experiments import mnist

    metrics = mnist.run(["--quiet", "--out", str(tmp_path), "--data", str(mnist.shared_mnist()), "--models",
                         "nnx_cnn", "--seed", str(seed)])
    low, high, _ = mnist.BANDS[("nnx_cnn", 1)]
    assert metrics["nnx_cnn_params"] == mnist.NNX_CNN_PARAMS
    assert low <= metrics["nnx_cnn_test_accuracy"] <= high, f"seed {seed}: {metrics['nnx_cnn_test_accuracy']}"
