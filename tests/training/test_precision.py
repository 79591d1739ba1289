"""Mixed precision: half-precision compute, float32 parameters and optimizer state, float16 loss scaling."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.digits import CNN_LAYERS, load_split
from jaxdl import MLP, ConvNet, create_train_state, evaluate, fit, make_train_step
from jaxdl.training.precision import with_precision
from tests.support import tolerance
from tests.support.toy_data import CE, blobs


def floating_dtypes(tree) -> set:
    return {str(leaf.dtype) for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)}


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_half_precision_computes_in_half_and_keeps_float32_masters(precision):
    x, y = blobs(64)
    state, history = fit(MLP(features=(16,), num_outputs=3), x, y, loss=CE, epochs=3, batch_size=16,
                         precision=precision, verbose=0)
    model = state.apply_fn.__self__
    assert model.dtype == jnp.dtype(precision)
    assert floating_dtypes(state.params) == floating_dtypes(state.opt_state) == {"float32"}
    outputs = state.apply_fn(state.variables, x[:4])
    assert outputs.dtype == jnp.dtype(precision)
    assert history["loss"][-1] < history["loss"][0]  # it trains
    assert (state.dynamic_scale is not None) == (precision == "float16")


STEP = make_train_step(CE)  # one compiled step per state structure, shared by the tests below


def sgd_state(precision):
    """A 2-layer MLP with plain SGD (rate 1): an update is the gradient itself, so its scale shows."""
    x, _ = blobs(16)
    return create_train_state(MLP(features=(8,), num_outputs=3), optax.sgd(1.0), x.shape[1:], jax.random.key(0),
                              precision=precision)


def with_scale(state, scale, fin_steps):
    return state.replace(dynamic_scale=state.dynamic_scale.replace(scale=jnp.asarray(scale, jnp.float32),
                                                                   fin_steps=jnp.asarray(fin_steps, jnp.int32)))


def test_a_float16_sgd_step_updates_as_the_float32_step_does():
    """The loss is scaled by 2^15 before differentiating and the gradients divided back: with SGD (not
    scale-invariant as Adam is) the float16 update is the float32 one within float16's rounding.

    Seen failing on a variant that never divides the gradients by the scale (updates 32768x too large).
    """
    x, y = blobs(16)
    step = STEP
    start = jax.tree.map(np.asarray, sgd_state(None).params)
    (half, half_sums), (full, full_sums) = [step(sgd_state(p), {"x": x, "y": y}) for p in ("float16", None)]
    assert float(half.dynamic_scale.scale) == 2.0 ** 15  # the scale the update went through
    update = lambda state: jax.tree.map(lambda new, old: np.asarray(new) - old, state.params, start)
    magnitude = max(float(np.abs(leaf).max()) for leaf in jax.tree.leaves(update(full)))
    assert magnitude > 0.1  # a real step, not a vanishing one
    tolerance.assert_close(update(half), update(full), tolerance.float16_update(magnitude))
    # The logged loss is unscaled too (float16 outputs, summed in float32)
    tolerance.assert_close(half_sums["loss"], full_sums["loss"], tolerance.float16_update(float(full_sums["loss"])))


def test_the_float16_scale_doubles_after_its_period_of_finite_steps():
    """Flax's DynamicScale counts finite steps; at `growth_interval` of them the next finite step doubles the scale
    and restarts the count.

    Seen failing on a variant whose step keeps the incoming loss scale (the scale never moves).
    """
    x, y = blobs(16)
    step = STEP
    state = sgd_state("float16")
    period = int(state.dynamic_scale.growth_interval)
    state, _ = step(with_scale(state, 2.0 ** 10, period - 1), {"x": x, "y": y})
    assert (float(state.dynamic_scale.scale), int(state.dynamic_scale.fin_steps)) == (2.0 ** 10, period)
    state, _ = step(state, {"x": x, "y": y})
    assert (float(state.dynamic_scale.scale), int(state.dynamic_scale.fin_steps)) == (2.0 ** 11, 0)
    assert int(state.step) == 2


def test_float16_skips_a_step_whose_gradients_overflow_and_lowers_the_scale():
    """Seen failing on a variant whose step keeps the incoming loss scale (not halved)."""
    x, y = blobs(16)
    step = STEP
    # A loss scaled by 2^40 overflows float16 (largest 65504): the update is skipped, the scale halved and
    # its count of finite steps restarted.
    huge = with_scale(sgd_state("float16"), 2.0 ** 40, 7)
    before = jax.tree.map(np.asarray, huge.params)
    after, _ = step(huge, {"x": x, "y": y})
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, after.params), before)
    assert float(after.dynamic_scale.scale) == 2.0 ** 39 and int(after.dynamic_scale.fin_steps) == 0
    assert int(after.step) == 1
    # At the default scale (2^15) the gradients fit: the parameters move.
    moved, _ = step(sgd_state("float16"), {"x": x, "y": y})
    assert not np.array_equal(np.asarray(moved.params["logits"]["kernel"]), before["logits"]["kernel"])


@pytest.mark.slow  # 13 s, the suite's third-longest test; `make bands` runs it with its five-seed bands
def test_bfloat16_digits_cnn_is_within_a_point_of_float32():
    """The issue's bar: the digits CNN trained in bfloat16 reaches float32's test accuracy to 1 point.

    20 epochs (the experiment runs up to 40) keep the test short; both runs have the same seed and
    batches, so they differ by bfloat16's rounding alone. After 10 epochs the gap was still -0.8
    points for seed 0, too close to the bar to test there. The five-seed bands are
    `tests/project/test_seed_bands.py::test_bfloat16_digits_cnn_gap_band` (`make bands`).
    """
    (x_train, y_train), _, (x_test, y_test) = load_split(0)
    accuracy = {}
    for precision in (None, "bfloat16"):
        state, _ = fit(ConvNet(layers=CNN_LAYERS), x_train, y_train, loss=CE, optimizer=optax.adam(1e-3),
                       epochs=20, batch_size=32, seed=0, precision=precision, verbose=0)
        accuracy[precision] = evaluate(state, x_test, y_test, loss=CE)["accuracy"]
    # Of the 360 test digits, seeds 0-4 gave float32 352, 355, 350, 357, 351 (0.972..0.992); band 349/360
    # (0.969..), one digit under the lowest seed and three under this test's seed 0 (352).
    assert accuracy[None] >= 349 / 360
    # bfloat16 minus float32, seeds 0-4: +1, +2, +1, -2, -2 digits; band |gap| <= 3 digits (0.01 of 360 = 3.6),
    # one beyond the largest seed and two beyond seed 0's +1 (353 against 352).
    assert abs(accuracy["bfloat16"] - accuracy[None]) <= 0.01


def test_precision_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match=r"precision must be one of \['bfloat16', 'float16', 'float32'\], "
                                         r"got 'half'"):
        with_precision(MLP(features=(4,), num_outputs=2), "half")

    class NoDtype(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(2)(x)

    with pytest.raises(ValueError, match="NoDtype has no `dtype` field"):
        with_precision(NoDtype(), "bfloat16")
    x, y = blobs(16)
    state, _ = fit(MLP(features=(4,), num_outputs=3), x, y, loss=CE, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"fit\(state=..., precision=...\): a state computes in its model's dtype"):
        fit(None, x, y, loss=CE, state=state, precision="bfloat16", verbose=0)


def test_a_float16_run_resumes_with_its_loss_scale(tmp_path):
    """The loss scale is part of the run: a resumed float16 run ends bitwise as the uninterrupted one."""
    x, y = blobs(64)
    options = dict(loss=CE, batch_size=32, precision="float16", verbose=0)
    whole, _ = fit(MLP(features=(8,), num_outputs=3), x, y, epochs=3, **options)
    fit(MLP(features=(8,), num_outputs=3), x, y, epochs=2, checkpoint_dir=tmp_path, **options)
    resumed, _ = fit(MLP(features=(8,), num_outputs=3), x, y, epochs=3, checkpoint_dir=tmp_path, **options)
    assert float(whole.dynamic_scale.scale) < 2.0 ** 15  # the first steps overflowed and lowered it
    for a, b in zip(jax.tree.leaves((whole.params, whole.dynamic_scale)),
                    jax.tree.leaves((resumed.params, resumed.dynamic_scale))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_experiments_pass_precision_to_fit(tmp_path):
    from experiments.common import checkpointing, parser

    cli = parser("An experiment.", precision=True)
    assert checkpointing(cli.parse_args([]))("model") == {}
    chosen = cli.parse_args(["--precision", "bfloat16", "--checkpoint-dir", str(tmp_path)])
    assert checkpointing(chosen)("model") == {"precision": "bfloat16", "checkpoint_dir": tmp_path / "model"}
    with pytest.raises(SystemExit):
        cli.parse_args(["--precision", "half"])
