"""Every Flax train-flag convention through fit, evaluate, predict, mc_predict and the step factories.

Flax models say "training" as `train: bool` (flax's examples), `training: bool`
or `deterministic: bool` (inverted), with or without a default, or take no flag.
Each is detected from the model's signature (`jaxdl.models.contract`), and each check
below shows the flag really reaches the layers: dropout and batch statistics on
in training, off in evaluation (not only that nothing raises).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdl import create_train_state, evaluate, fit, make_eval_step, make_train_step, mc_predict, predict
from jaxdl.models.contract import detect_train_flag, flag_kwargs
from tests.support.toy_data import CE, blobs as toy_blobs

TEMPLATE = """
class Net(nn.Module):
    @nn.compact
    def __call__(self, x, {flag}: bool{default}):
        training = {training}
        x = nn.Dense(8)(x)
        if {dropout}:
            x = nn.Dropout(0.5)(x, not training)  # deterministic passed by position, as many models do
        else:
            x = nn.BatchNorm(use_running_average=not training, momentum=0.5)(x)
        return nn.Dense(3)(x)
"""


def convention(flag: str, required: bool, layer: str):
    """A Linen model taking `flag` (required or with its inference default), with one Dropout or BatchNorm."""
    default = "" if required else (" = True" if flag == "deterministic" else " = False")
    training = "not deterministic" if flag == "deterministic" else flag
    namespace = {"nn": nn}
    exec(TEMPLATE.format(flag=flag, default=default, training=training, dropout=layer == "dropout"), namespace)
    return namespace["Net"]()


CONVENTIONS = [(flag, required, layer) for flag in ("train", "training", "deterministic")
               for required in (True, False) for layer in ("dropout", "batchnorm")]


def sparse_cross_entropy(logits, y):
    return float(optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), jnp.asarray(y)).mean())


@pytest.mark.parametrize("flag, required, layer", CONVENTIONS,
                         ids=[f"{f}-{'required' if r else 'default'}-{layer}" for f, r, layer in CONVENTIONS])
def test_each_convention_trains_in_training_mode_and_evaluates_in_inference_mode(flag, required, layer):
    model = convention(flag, required, layer)
    assert detect_train_flag(model) == flag
    x, y = toy_blobs(32)
    # Learning rate 0: the parameters never move, so the training loss differs from the evaluation loss only
    # through the mode (dropout masks, or batch statistics instead of the running ones).
    state, history = fit(model, x, y, loss=CE, optimizer=optax.sgd(0.0), batch_size=32, shuffle=False,
                         verbose=0)
    inference = flag_kwargs(flag, False)
    reference = np.asarray(model.apply(state.variables, x, **inference))  # the model run by hand, inference mode
    outputs = predict(state, x)
    np.testing.assert_allclose(outputs, reference, rtol=1e-6, atol=1e-6)  # one program vs another, float32
    np.testing.assert_array_equal(predict(state, x), outputs)  # inference is deterministic
    evaluated = evaluate(state, x, y, loss=CE)["loss"]
    assert evaluated == pytest.approx(sparse_cross_entropy(reference, y), rel=1e-5)  # float32 sums, other order
    assert abs(history["loss"][0] - evaluated) > 1e-3  # training mode is another computation
    if layer == "batchnorm":  # training updated the running statistics (momentum 0.5): they left their start
        assert not np.allclose(state.batch_stats["BatchNorm_0"]["mean"], 0.0)
        if flag == "train" and required:  # once: mc_predict on running statistics, nothing to drop
            with pytest.warns(UserWarning, match="no nn.Dropout layer"):
                mean, std = mc_predict(None, state, x, 4, jax.random.key(0))
            np.testing.assert_array_equal(std, 0.0)
            np.testing.assert_allclose(mean, outputs, rtol=1e-6, atol=1e-6)
    else:
        mean, std = mc_predict(None, state, x, 16, jax.random.key(0))  # a TrainState, its own model
        assert (std > 0).mean() > 0.9  # dropout on in every pass: the passes differ
        assert np.abs(mean - outputs).max() > 1e-3

    if not required:
        return  # a default changes nothing the step factories do: the required forms check them
    # The step factories read the same flag at trace time.
    fresh = create_train_state(model, optax.sgd(0.0), (3,), jax.random.key(1))
    eval_step = make_eval_step(CE)
    first = eval_step(fresh, {"x": x, "y": y})
    assert float(first["loss"]) == pytest.approx(float(eval_step(fresh, {"x": x, "y": y})["loss"]), abs=0)
    trained, sums = make_train_step(CE)(jax.tree.map(jnp.copy, fresh), {"x": x, "y": y})
    assert abs(float(sums["loss"]) - float(first["loss"])) > 1e-3


def test_a_model_without_a_flag_goes_through_everything():
    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))

    x, y = toy_blobs(32)
    assert detect_train_flag(Plain()) is None
    state, history = fit(Plain(), x, y, loss=CE, optimizer=optax.sgd(0.0), batch_size=32, shuffle=False,
                         verbose=0)
    reference = np.asarray(Plain().apply(state.variables, x))
    np.testing.assert_allclose(predict(state, x), reference, rtol=1e-6, atol=1e-6)
    # no dropout and no batch statistics: training and evaluation are the same computation
    assert history["loss"][0] == pytest.approx(evaluate(state, x, y, loss=CE)["loss"], rel=1e-5)
    with pytest.warns(UserWarning, match="no nn.Dropout layer"):
        mc_predict(Plain(), state.variables, x, 2, 0)


def test_ambiguous_and_unreadable_signatures_name_the_argument_to_pass():
    class Both(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False, deterministic: bool = True):
            return nn.Dense(3)(x)

    class Forwarding(nn.Module):
        @nn.compact
        def __call__(self, x, **kwargs):
            return nn.Dense(3)(x)

    x, y = toy_blobs(16)
    with pytest.raises(ValueError, match=r"Both.__call__ takes several train flags \(train, deterministic\).*"
                                         r"pass train_flag='train'"):
        fit(Both(), x, y, loss=CE, verbose=0)
    fit(Both(), x, y, loss=CE, verbose=0, train_flag="deterministic")  # said explicitly: fine
    with pytest.raises(ValueError, match=r"Forwarding.__call__ takes \*\*kwargs.*pass train_flag='train', "
                                         r"'training', 'deterministic' or None"):
        fit(Forwarding(), x, y, loss=CE, verbose=0)
    fit(Forwarding(), x, y, loss=CE, verbose=0, train_flag=None)
