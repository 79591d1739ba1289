"""jaxdl.mc_predict: Monte-Carlo dropout in one compiled vmap, reproducible from its key, BatchNorm on running
averages."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdl import MLP, mc_predict
from jaxdl.training.uncertainty import _mc_moments
from tests.support import tolerance

X = np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32)
N = 100  # samples per input, as the lesson; one (model, input shape, N) is one compiled program
# One model object for the tests below: its compiled sampler is shared (the cache key is the model).
DROPOUT_BN = MLP(features=(16,), num_outputs=2, dropout_rate=0.5, input_batch_norm=True)


def variables_with_statistics(model):
    """Initialised variables whose BatchNorm running averages are far from a batch's own (mean 3, variance 4)."""
    variables = model.init(jax.random.key(0), jnp.zeros((1, 5)))
    stats = {"mean": jnp.full((5,), 3.0), "var": jnp.full((5,), 4.0)}
    return {**variables, "batch_stats": {"input_batch_norm": stats}}


def test_rate_zero_gives_zero_spread_and_the_plain_prediction():
    model = MLP(features=(16,), num_outputs=2, dropout_rate=0.0, input_batch_norm=True)
    variables = variables_with_statistics(model)
    with pytest.warns(UserWarning, match="no nn.Dropout layer with a rate above 0"):
        mean, std = mc_predict(model, variables, X[:4], N, jax.random.key(1))
    assert mean.shape == std.shape == (4, 2)
    assert np.all(std == 0.0)  # equal samples give exactly 0: moments are taken around the first sample
    # The same forward pass, once in a vmap and once alone: a few roundings apart at most (fusion may differ).
    tolerance.assert_close(mean, model.apply(variables, X[:4], train=False), tolerance.ONE_OP)


def test_samples_are_reproducible_from_the_key_and_differ_between_keys():
    variables = variables_with_statistics(DROPOUT_BN)
    mean, std = mc_predict(DROPOUT_BN, variables, X[:4], N, jax.random.key(1))
    compiled = _mc_moments._cache_size()
    again_mean, again_std = mc_predict(DROPOUT_BN, variables, X[:4], N, jax.random.key(1))
    assert np.array_equal(mean, again_mean) and np.array_equal(std, again_std)  # same key, same masks: bitwise
    other_mean, other_std = mc_predict(DROPOUT_BN, variables, X[:4], N, jax.random.key(2))
    assert not np.array_equal(mean, other_mean) and not np.array_equal(std, other_std)
    assert _mc_moments._cache_size() == compiled  # one program for any key: the samples are a vmap, not a loop
    assert np.all(std > 0)  # 16 hidden units at rate 0.5: 100 samples never all drop the same way
    same_seed, _ = mc_predict(DROPOUT_BN, variables, X[:4], N, 1)  # an int seed is jax.random.key(seed)
    assert np.array_equal(same_seed, mean)


def test_batchnorm_uses_running_averages_so_inputs_do_not_affect_each_other():
    variables = variables_with_statistics(DROPOUT_BN)
    mine = X[:4]
    others = np.concatenate([X[:2], 100 * X[2:4]])  # the same first two inputs beside very different ones
    mean, std = mc_predict(DROPOUT_BN, variables, mine, N, jax.random.key(1))
    mean_beside_others, std_beside_others = mc_predict(DROPOUT_BN, variables, others, N, jax.random.key(1))
    # Same key and shape: the same masks. Rows are computed independently, so equal up to roundings.
    tolerance.assert_close(mean_beside_others[:2], mean[:2], tolerance.ONE_OP)
    tolerance.assert_close(std_beside_others[:2], std[:2], tolerance.ONE_OP)
    # What train=True would have done: normalise by the batch's own statistics, which the other rows move.
    with_batch_statistics = lambda x: DROPOUT_BN.clone(dropout_rate=0.0).apply(
        variables, x, train=True, mutable=["batch_stats"])[0][:2]
    assert np.abs(with_batch_statistics(mine) - with_batch_statistics(others)).max() > 0.1


def test_batches_of_inputs_draw_from_folded_keys():
    variables = variables_with_statistics(DROPOUT_BN)
    mean, std = mc_predict(DROPOUT_BN, variables, X[:7], N, jax.random.key(3), batch_size=4)  # 4 + 3 (padded)
    first, first_std = mc_predict(DROPOUT_BN, variables, X[:4], N, jax.random.fold_in(jax.random.key(3), 0))
    assert mean.shape == (7, 2) and np.array_equal(mean[:4], first) and np.array_equal(std[:4], first_std)
    last, _ = mc_predict(DROPOUT_BN, variables, np.concatenate([X[4:7], np.zeros((1, 5), np.float32)]), N,
                         jax.random.fold_in(jax.random.key(3), 1))
    assert np.array_equal(mean[4:], last[:3])  # the padded batch: its real rows, as if run alone


def test_bad_arguments_are_named():
    variables = variables_with_statistics(DROPOUT_BN)
    with pytest.raises(ValueError, match="n_samples must be a positive integer, got 0"):
        mc_predict(DROPOUT_BN, variables, X, 0, jax.random.key(0))
    with pytest.raises(ValueError, match=r"x must be a non-empty batch of inputs, shape \(N, ...\); got shape \(5,\)"):
        mc_predict(DROPOUT_BN, variables, X[0], 10, jax.random.key(0))
    with pytest.raises(ValueError, match="batch_size must be a positive integer or None, got -1"):
        mc_predict(DROPOUT_BN, variables, X, 10, jax.random.key(0), batch_size=-1)


class CallTimeDropout(nn.Module):
    """Flax's examples' style: `deterministic` given when Dropout is called, and a list field (unhashable)."""

    widths: list

    @nn.compact
    def __call__(self, x, train: bool = False):
        for width in self.widths:
            x = nn.Dropout(0.5)(nn.relu(nn.Dense(width)(x)), deterministic=not train)
        return nn.Dense(1)(x)


def test_any_linen_module_with_dropout_works_whoever_sets_deterministic():
    model = CallTimeDropout([8])
    variables = model.init(jax.random.key(0), jnp.zeros((1, 5)))
    mean, std = mc_predict(model, variables, X[:4], N, jax.random.key(1))
    again, _ = mc_predict(model, variables, X[:4], N, jax.random.key(1))
    assert mean.shape == (4, 1) and np.all(std > 0) and np.array_equal(mean, again)
