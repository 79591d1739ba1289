"""The functional training core: steps, fit, reproducibility, compilation counts, bad input."""
import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdl import (
    MLP,
    ConvNet,
    EarlyStopping,
    create_train_state,
    data,
    evaluate,
    fit,
    load_model,
    make_eval_step,
    make_train_step,
    metrics_from_sums,
    predict,
    save_model,
)
from jaxdl.runtime.sharding import data_mesh
from jaxdl.training.steps import compiled_epoch, compiled_steps, seed_rngs, zero_totals
from tests.support import tolerance
from tests.support.toy_data import CE, blobs


def params_of(state):
    return jax.tree.map(np.asarray, jax.device_get(state.params))


def test_fits_streamed_steps_donate_the_states_and_not_the_running_totals():
    """The totals are a few scalars, and donating them made each dispatch wait for the step before it on a
    4-device mesh: the MNIST CNN's `fit` took 15.0 against 13.9 ms a step (medians of 6 alternating runs)."""
    x, y = blobs(8)
    state = create_train_state(MLP(features=(4,), num_outputs=3), optax.sgd(0.1), (3,), jax.random.key(0))
    previous, totals = jax.tree.map(jnp.copy, state), zero_totals(("accuracy",))
    batches = {"x": jnp.asarray(x)[None], "y": jnp.asarray(y)[None]}
    compiled_steps(CE, ("accuracy",))(state, previous, jnp.bool_(True), totals, batches)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves((state.params, previous.params)))
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(totals))


def test_train_step_gradient_matches_finite_differences():
    x, y = blobs(8)
    model = MLP(features=(4,), num_outputs=3, activation="tanh")
    learning_rate = 1.0
    state = create_train_state(model, optax.sgd(learning_rate), (3,), jax.random.key(0))
    before = params_of(state)
    state, _ = make_train_step(CE, jit=False)(state, {"x": jnp.asarray(x), "y": jnp.asarray(y)})
    step_gradient = jax.tree.map(lambda b, a: (b - a) / learning_rate, before, params_of(state))

    def loss_at(params):  # float64 reference of the same objective
        h = np.tanh(x.astype(np.float64) @ params["dense_0"]["kernel"] + params["dense_0"]["bias"])
        logits = h @ params["logits"]["kernel"] + params["logits"]["bias"]
        log_z = np.log(np.exp(logits).sum(axis=1))
        return float(np.mean(log_z - logits[np.arange(len(y)), y]))

    params64 = jax.tree.map(lambda p: p.astype(np.float64), before)
    eps = 1e-6
    for layer, name in [("dense_0", "kernel"), ("dense_0", "bias"), ("logits", "kernel"), ("logits", "bias")]:
        flat = params64[layer][name].reshape(-1)
        for i in range(flat.size):
            old = flat[i]
            flat[i] = old + eps
            up = loss_at(params64)
            flat[i] = old - eps
            down = loss_at(params64)
            flat[i] = old
            numeric = (up - down) / (2 * eps)
            tolerance.assert_close(step_gradient[layer][name].reshape(-1)[i], numeric,
                                   tolerance.GRADIENT_AGAINST_FLOAT64, f"{layer}/{name}[{i}]")


def test_masked_padding_gives_the_gradient_of_the_real_examples():
    x, y = blobs(6)
    model = MLP(features=(4,), num_outputs=3)
    step = make_train_step(CE, jit=False)
    state = create_train_state(model, optax.sgd(0.1), (3,), jax.random.key(1))
    real, _ = step(state, {"x": x[:4], "y": y[:4]})
    padded, sums = step(state, {"x": x, "y": y, "mask": np.array([1, 1, 1, 1, 0, 0], np.float32)})
    tolerance.assert_close(padded.params, real.params, tolerance.FEW_OPS)
    assert float(sums["count"]) == 4.0


def test_same_seed_is_bitwise_reproducible_and_another_seed_differs():
    x, y = blobs(50)
    model = MLP(features=(8,), num_outputs=3, dropout_rate=0.3)
    run = lambda seed: params_of(fit(model, x, y, loss=CE, epochs=3, batch_size=8, seed=seed, verbose=False)[0])
    first, again, other = run(3), run(3), run(4)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)))
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(other)))


def test_train_step_compiles_once_including_the_padded_last_batch():
    x, y = blobs(10)
    state = create_train_state(MLP(features=(4,), num_outputs=3), optax.adam(1e-2), (3,), jax.random.key(0))
    step = make_train_step(CE)
    shapes = []
    for batch in data.batches(x, y, batch_size=4, seed=0):  # 4 + 4 + 2 real examples
        state, sums = step(state, batch)
        shapes.append(int(sums["count"]))
    for batch in data.batches(x, y, batch_size=4, seed=1):
        state, _ = step(state, batch)
    assert shapes == [4, 4, 2]
    assert step.jitted._cache_size() == 1


def test_fit_compiles_one_epoch_function_for_all_epochs():
    x, y = blobs(37)  # 37 = 4 * 8 + 5: a partial last batch every epoch
    model = MLP(features=(5,), num_outputs=3)
    epoch_fn = compiled_epoch(CE, ("accuracy",), 8, True, False, data_mesh())  # fit's mesh: all devices
    epoch_fn.clear_cache()
    _, history = fit(model, x, y, loss=CE, epochs=4, batch_size=8, verbose=False)
    assert len(history["loss"]) == 4
    assert epoch_fn._cache_size() == 1


def test_fit_learns_and_reports_keras_history_keys():
    x, y = blobs(120)
    state, history = fit(MLP(features=(16,), num_outputs=3), x, y, loss=CE, epochs=30, batch_size=16,
                         validation_split=0.25, verbose=False, optimizer=optax.adam(1e-2))
    assert list(history) == ["loss", "accuracy", "val_loss", "val_accuracy"]  # Keras's order
    assert history["loss"][-1] < history["loss"][0]
    assert history["val_accuracy"][-1] >= 0.9
    result = evaluate(state, x[90:], y[90:], loss=CE)
    assert result["accuracy"] == history["val_accuracy"][-1]  # counts of correct examples: exact
    tolerance.assert_close(result["loss"], history["val_loss"][-1], tolerance.FEW_OPS)


def test_batchnorm_statistics_are_updated_in_training_and_used_in_inference():
    x, y = blobs(64)
    model = MLP(features=(8,), num_outputs=3, batch_norm=True)
    state, _ = fit(model, x, y, loss=CE, epochs=2, batch_size=16, verbose=False)
    mean = np.asarray(state.batch_stats["batch_norm_0"]["mean"])
    assert np.abs(mean).sum() > 0
    eval_sums = make_eval_step(CE)(state, {"x": x, "y": y})
    tolerance.assert_close(metrics_from_sums(eval_sums)["loss"], evaluate(state, x, y, loss=CE)["loss"],
                           tolerance.FEW_OPS)


def test_early_stopping_restores_the_best_epoch():
    x, y = blobs(80, seed=2)
    x_val, y_val = blobs(40, seed=3)
    stop = EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True)
    state, history = fit(MLP(features=(32,), num_outputs=3), x, y, loss=CE, epochs=200, batch_size=8,
                         optimizer=optax.adam(0.05), validation_data=(x_val, y_val), callbacks=[stop],
                         verbose=False)
    assert len(history["val_loss"]) < 200
    best = int(np.argmin(history["val_loss"]))
    assert stop.best_epoch == best and len(history["val_loss"]) == best + 3
    tolerance.assert_close(evaluate(state, x_val, y_val, loss=CE)["loss"], history["val_loss"][best], tolerance.FEW_OPS)


def test_early_stopping_names_a_missing_monitor():
    x, y = blobs(20)
    with pytest.raises(ValueError, match="monitors 'val_loss'.*pass validation data"):
        fit(MLP(features=(4,), num_outputs=3), x, y, loss=CE, epochs=2, callbacks=[EarlyStopping()],
            verbose=False)


def test_divergence_stops_training_and_returns_the_last_finite_state():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 2)).astype(np.float32)
    y = (x @ np.array([3.0, -2.0])).astype(np.float32)
    model = MLP(features=(8,), num_outputs=1)
    with pytest.warns(RuntimeWarning, match="became NaN or infinite at epoch .* step .* the last one whose loss, "
                                            "gradients and parameters"):
        state, history = fit(model, x, y, loss="mse", metrics=(), epochs=50, batch_size=8,
                             optimizer=optax.sgd(1e3), verbose=False)
    assert len(history.get("loss", [])) < 50
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params_of(state)))
    assert np.isfinite(evaluate(state, x, y, loss="mse", metrics=())["loss"])  # the state itself, not only its params
    assert np.isfinite(predict(state, x)).all()


class Climber(nn.Module):
    """w * x with w starting at 0: on x = 1 the loss `-w` makes SGD(1) add exactly 1 to w each step."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(1, use_bias=False, kernel_init=nn.initializers.zeros)(x)


@pytest.mark.parametrize("ceiling, returned", [(2.5, 2.0), (3.5, 3.0)])
def test_a_state_whose_own_loss_is_not_finite_is_rolled_back_to_the_one_before_it(ceiling, returned):
    """The loss is finite at w = 0, 1, 2, ... below `ceiling` and NaN above it (log of a negative number).

    Four steps an epoch: a ceiling of 2.5 breaks at step 4 of epoch 1, 3.5 at the first step of epoch 2,
    where the state before it is the one before the last step of epoch 1, carried across. Seen failing
    with the epoch's fast form never moving `previous` on: 3.5 then returned w = 0.
    """
    def climbing_loss(outputs, batch):
        return -outputs[:, 0] + 0.0 * jnp.log(ceiling - outputs[:, 0])

    x, y = np.ones((16, 1), np.float32), np.zeros(16, np.float32)
    with pytest.warns(RuntimeWarning, match="became NaN or infinite"):
        state, _ = fit(Climber(), x, y, loss=climbing_loss, metrics=(), epochs=3, batch_size=4, shuffle=False,
                       optimizer=optax.sgd(1.0), verbose=False)
    assert float(params_of(state)["Dense_0"]["kernel"][0, 0]) == returned  # w's steps are exact in float32
    assert int(state.step) == returned


def test_an_update_that_overflows_the_parameters_is_refused_though_its_loss_was_finite():
    """The loss is computed before the update: only checking the new parameters catches this step."""
    x, y = blobs(16)
    model = MLP(features=(4,), num_outputs=3)
    overflowing = optax.sgd(float("inf"))  # the first update's parameters are not finite
    initial = create_train_state(model, overflowing, (3,), seed_rngs(0)[0])
    with pytest.warns(RuntimeWarning, match="at epoch 1, step 1 of 2"):
        state, history = fit(model, x, y, loss=CE, epochs=3, batch_size=8, optimizer=overflowing, verbose=False)
    assert history == {} and int(state.step) == 0
    jax.tree.map(np.testing.assert_array_equal, params_of(state), params_of(initial))


def test_padding_never_enters_batchnorm_statistics():
    """37 examples in batches of 8: fit's last batch holds 5 real examples and nothing else, as in Keras."""
    x, y = blobs(37)
    model = MLP(features=(8,), num_outputs=3, batch_norm=True, dropout_rate=0.2)
    start = create_train_state(model, optax.sgd(0.1), (3,), seed_rngs(0)[0])
    fitted, _ = fit(None, x, y, loss=CE, epochs=1, batch_size=8, shuffle=False, state=start, verbose=False)
    step = make_train_step(CE)
    by_hand = jax.tree.map(jnp.copy, start)
    sizes = []
    for batch in data.batches(x, y, batch_size=8, pad=False):
        by_hand, sums = step(by_hand, batch)
        sizes.append(int(sums["count"]))
    assert sizes == [8, 8, 8, 8, 5]
    # Same operations in a scan and in separate calls: XLA may fuse them differently, so the last bits
    # can differ; a padding row in the statistics moves them by ~0.4 (the defect this guards against).
    tolerance.assert_close(fitted.batch_stats, by_hand.batch_stats, tolerance.FEW_OPS)
    tolerance.assert_close(fitted.params, by_hand.params, tolerance.FEW_OPS)
    with pytest.raises(ValueError, match="BatchNorm statistics.*padded batch.*pad=False"):
        step(by_hand, next(data.batches(x, y, batch_size=8)))


def test_fit_continues_a_state_without_consuming_it_and_without_replaying_orders():
    x, y = blobs(37)
    model = MLP(features=(8,), num_outputs=3, dropout_rate=0.2)
    whole, whole_history = fit(model, x, y, loss=CE, epochs=5, batch_size=8, seed=1, verbose=False)
    first, first_history = fit(model, x, y, loss=CE, epochs=2, batch_size=8, seed=1, verbose=False)
    kept = params_of(first)
    rest, rest_history = fit(None, x, y, loss=CE, epochs=5, initial_epoch=2, batch_size=8, seed=1, state=first,
                             verbose=False)
    assert len(rest_history["loss"]) == 3
    assert first_history["loss"] + rest_history["loss"] == whole_history["loss"]
    assert all(np.array_equal(a, b)
               for a, b in zip(jax.tree.leaves(params_of(rest)), jax.tree.leaves(params_of(whole))))
    # the caller's state is still usable and unchanged
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params_of(first)), jax.tree.leaves(kept)))
    assert np.isfinite(predict(first, x)).all()
    with pytest.raises(ValueError, match="continues with the optimizer the state was built with"):
        fit(None, x, y, loss=CE, state=first, optimizer=optax.sgd(0.1), verbose=False)
    with pytest.raises(ValueError, match="trains the model the state was built for"):
        fit(MLP(features=(2,), num_outputs=3), x, y, loss=CE, state=first, verbose=False)
    with pytest.raises(ValueError, match="initial_epoch must be an integer from 0 to epochs=2, got 3"):
        fit(None, x, y, loss=CE, state=first, epochs=2, initial_epoch=3, verbose=False)


def test_unknown_metric_names_fail_before_compiling():
    with pytest.raises(ValueError, match="accurcy"):
        make_eval_step(CE, metrics=("accurcy",))
    with pytest.raises(ValueError, match="accurcy"):
        make_train_step(CE, metrics=("accurcy",))


def test_save_then_load_in_a_new_process_gives_identical_predictions(tmp_path):
    x, y = blobs(40)
    model = ConvNet(layers=(("dense", 8, "relu"), ("batchnorm",), ("dropout", 0.2), ("dense", 3)))
    state, _ = fit(model, x, y, loss=CE, epochs=2, batch_size=8, verbose=False)
    saved = save_model(tmp_path / "model", model, state.variables, metadata={"classes": ["a", "b", "c"]})
    expected = predict(state, x)
    code = ("import sys, json, numpy as np; from jaxdl import load_model, predict; "
            "m, v, meta = load_model(sys.argv[1]); x = np.load(sys.argv[2]); "
            "np.save(sys.argv[3], predict(m, x, variables=v)); print(json.dumps(meta))")
    np.save(tmp_path / "x.npy", x)
    done = subprocess.run([sys.executable, "-c", code, str(saved), str(tmp_path / "x.npy"),
                           str(tmp_path / "out.npy")], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"classes": ["a", "b", "c"]}
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)


def test_saving_never_overwrites_without_being_asked(tmp_path):
    x, y = blobs(10)
    model = MLP(features=(4,), num_outputs=3)
    state = create_train_state(model, optax.adam(1e-3), (3,), jax.random.key(0))
    save_model(tmp_path / "m", model, state.variables, metadata={"version": 1})
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        save_model(tmp_path / "m", model, state.variables)
    assert load_model(tmp_path / "m")[2] == {"version": 1}
    save_model(tmp_path / "m", model, state.variables, metadata={"version": 2}, overwrite=True)
    assert load_model(tmp_path / "m")[2] == {"version": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging folders left behind
    with pytest.raises(FileNotFoundError, match="not a saved jaxdl model"):
        load_model(tmp_path)


# --- bad input: each a clear error naming the problem -------------------------------------------

@pytest.mark.parametrize("kwargs, x_change, y_change, message", [
    ({}, None, lambda y: y[:-1], "x has 30 examples but y has 29"),
    ({}, lambda x: x[:0], lambda y: y[:0], "x is empty"),
    ({}, lambda x: np.where(np.arange(x.size).reshape(x.shape) == 7, np.nan, x), None,
     "x contains NaN or infinite values \\(first in example 2\\)"),
    ({"batch_size": 0}, None, None, "batch_size must be a positive integer, got 0"),
    ({"batch_size": -4}, None, None, "batch_size must be a positive integer, got -4"),
    ({"validation_split": 1.0}, None, None, "validation_split must be between 0 and 1"),
    ({"validation_split": 0}, None, None, "validation_split must be between 0 and 1"),
    ({"validation_split": -0.2}, None, None, "validation_split must be between 0 and 1"),
    ({}, None, lambda y: y + 3, "y holds classes 3..5, but the model has 3 outputs"),
])
def test_fit_rejects_bad_input_clearly(kwargs, x_change, y_change, message):
    x, y = blobs(30)
    x = x_change(x) if x_change else x
    y = y_change(y) if y_change else y
    with pytest.raises(ValueError, match=message):
        fit(MLP(features=(4,), num_outputs=3), x, y, loss=CE, epochs=1, verbose=False, **kwargs)


def test_wrong_feature_dimension_is_named():
    x, y = blobs(30)
    state, _ = fit(MLP(features=(4,), num_outputs=3), x, y, loss=CE, epochs=1, verbose=False)
    with pytest.raises(ValueError, match=r"x has per-example shape \(4,\), but the model was built for \(3,\)"):
        predict(state, np.zeros((5, 4), np.float32))
    with pytest.raises(ValueError, match=r"validation_data has per-example shape \(2,\)"):
        fit(MLP(features=(4,), num_outputs=3), x, y, loss=CE, validation_data=(x[:, :2], y), verbose=False)
    with pytest.raises(ValueError, match=r"per-example shape \(5,\)"):
        fit(None, np.zeros((30, 5), np.float32), y, loss=CE, state=state, verbose=False)
