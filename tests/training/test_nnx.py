"""Flax NNX modules through jaxdl's doors: fit, evaluate, predict, the pure steps, checkpoints and resume.

An NNX module is split once (`nnx.split`), trained by the same compiled steps
as a Linen module and written back into the user's object at the end
(`nnx.update`); these tests hold it to what an NNX user expects: training and
evaluation modes, its own random streams, carried variables, bitwise resume,
and the same numbers as the equivalent Linen model.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxdl import create_train_state, evaluate, fit, make_eval_step, make_train_step, predict, summary, trained_module
from jaxdl.training import mc_predict
from tests.support import tolerance
from tests.support.trees import raw

CE = "sparse_categorical_crossentropy"


class Net(nnx.Module):
    """Linear -> BatchNorm -> ReLU -> Dropout -> Linear: every kind of variable NNX carries.

    `bias=False` leaves out the hidden layer's bias, which BatchNorm cancels: its gradient is then zero up to
    rounding, and Adam turns that rounding into full-size steps whose direction depends on the order of the
    sums (seen: 2.8e-3 between 4 devices and 1).
    """

    def __init__(self, rngs: nnx.Rngs, dropout: float = 0.3, bias: bool = True):
        self.hidden = nnx.Linear(4, 16, use_bias=bias, rngs=rngs)
        self.norm = nnx.BatchNorm(16, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.out = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(nnx.relu(self.norm(self.hidden(x)))))


class Calls(nnx.Variable):
    """A user's own variable kind: neither a parameter nor a batch statistic."""


class Counting(nnx.Module):
    """A Dense layer that counts the training calls it served in a variable of its own."""

    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(4, 3, rngs=rngs)
        self.calls = Calls(jnp.zeros((), jnp.int32))
        self.training = True

    def __call__(self, x):
        if self.training:
            self.calls[...] += 1
        return self.dense(x)

    def train(self, **attributes):  # nnx's own mode switch, told about this module's flag too
        super().train(**attributes)
        self.training = True

    def eval(self, **attributes):
        super().eval(**attributes)
        self.training = False


def _data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = ((x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5)).astype(np.int32)
    return x, y


def _leaves(tree):
    """Every array of `tree`, random keys as their raw data."""
    return [np.asarray(raw(leaf)) for leaf in jax.tree.leaves(tree)]


def test_fit_trains_the_users_module_in_place_and_returns_state_and_history():
    x, y = _data()
    model = Net(nnx.Rngs(0))
    before = np.asarray(model.hidden.kernel[...]).copy()
    state, history = fit(model, x, y, loss=CE, epochs=3, batch_size=32, verbose=0)
    assert sorted(history) == ["accuracy", "loss"] and len(history["loss"]) == 3
    assert not np.array_equal(before, np.asarray(model.hidden.kernel[...]))
    np.testing.assert_array_equal(np.asarray(model.hidden.kernel[...]), np.asarray(state.params["hidden"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(model.norm.mean[...]), np.asarray(state.batch_stats["norm"]["mean"]))
    assert float(np.abs(np.asarray(model.norm.mean[...])).sum()) > 0  # the running average moved off its zeros
    back = trained_module(state)  # the one way back from any state: a new module holding its variables
    assert isinstance(back, Net)
    np.testing.assert_array_equal(np.asarray(back.out.kernel[...]), np.asarray(model.out.kernel[...]))


def test_training_mode_in_steps_evaluation_mode_in_evaluate_and_predict():
    x, y = _data()
    model = Net(nnx.Rngs(1), dropout=0.5)
    state = create_train_state(model, optax.sgd(0.0))  # a zero learning rate: only modes and statistics change
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    trained = [np.asarray(state.apply_fn(variables, x, train=True, mutable=True)[0]) for _ in range(2)]
    evaluated = [np.asarray(state.apply_fn(variables, x, train=False)) for _ in range(2)]
    np.testing.assert_array_equal(evaluated[0], evaluated[1])  # dropout off, BatchNorm on its running averages
    assert not np.array_equal(trained[0], evaluated[0])  # dropout on, BatchNorm on the batch's statistics
    copy = nnx.clone(model)
    copy.eval()
    tolerance.assert_close(predict(state, x), np.asarray(copy(x)), tolerance.FEW_OPS)
    tolerance.assert_close(predict(model, x), np.asarray(copy(x)), tolerance.FEW_OPS)
    assert evaluate(state, x, y, loss=CE) == evaluate(state, x, y, loss=CE)


def test_dropout_draws_from_the_modules_own_streams_reproducibly_and_anew_each_step():
    x, y = _data()
    runs = [fit(Net(nnx.Rngs(seed)), x, y, loss=CE, epochs=2, batch_size=32, verbose=0, shuffle=False)[1]
            for seed in (3, 3, 4)]
    assert runs[0] == runs[1]  # the same module seed: the same masks, the same history, bitwise
    assert runs[0] != runs[2]
    counts = fit(Net(nnx.Rngs(3)), x, y, loss=CE, epochs=2, batch_size=32, verbose=0)[0].batch_stats
    assert int(counts["drop"]["rngs"]["count"][...]) == 6  # one draw per step: 3 steps an epoch, 2 epochs


def test_a_users_own_variable_is_carried_updated_and_resumed(tmp_path):
    x, y = _data()
    model = Counting(nnx.Rngs(0))
    state, _ = fit(model, x, y, loss=CE, epochs=2, batch_size=32, verbose=0, checkpoint_dir=tmp_path / "run")
    assert int(model.calls[...]) == 6 and int(state.batch_stats["calls"][...]) == 6
    again = Counting(nnx.Rngs(0))
    fit(again, x, y, loss=CE, epochs=3, batch_size=32, verbose=0, checkpoint_dir=tmp_path / "run")
    assert int(again.calls[...]) == 9  # resumed from the saved 6, three more steps


def test_a_resumed_run_ends_bitwise_as_the_uninterrupted_one(tmp_path):
    x, y = _data()
    whole_state, whole = fit(Net(nnx.Rngs(0)), x, y, loss=CE, epochs=4, batch_size=32, verbose=0,
                             checkpoint_dir=tmp_path / "whole")
    fit(Net(nnx.Rngs(0)), x, y, loss=CE, epochs=2, batch_size=32, verbose=0, checkpoint_dir=tmp_path / "parts")
    resumed_state, resumed = fit(Net(nnx.Rngs(0)), x, y, loss=CE, epochs=4, batch_size=32, verbose=0,
                                 checkpoint_dir=tmp_path / "parts")
    assert resumed == whole
    for a, b in zip(_leaves((whole_state.params, whole_state.batch_stats)),
                    _leaves((resumed_state.params, resumed_state.batch_stats)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_your_own_loop_with_jaxdls_steps_on_an_nnx_state():
    x, y = _data()
    state = create_train_state(Net(nnx.Rngs(0)), optax.adam(1e-2))
    train_step, eval_step = make_train_step(CE), make_eval_step(CE)
    for start in range(0, 96, 32):
        state, _ = train_step(state, {"x": x[start:start + 32], "y": y[start:start + 32]})
    assert int(state.step) == 3
    sums = eval_step(state, {"x": x, "y": y})
    assert float(sums["count"]) == 96.0


class LinenTwin(nn.Module):
    """`Net` written in Linen, dropout 0, BatchNorm with NNX's defaults (momentum 0.99, epsilon 1e-5)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(16, name="hidden")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-5, name="norm")(x)
        return nn.Dense(3, name="out")(nn.relu(x))


def test_the_same_numbers_as_the_equivalent_linen_model():
    """Weights copied from the NNX module into its Linen twin; the same seed, data and optimizer. Both compile the
    same operations in the same order, so the trained parameters, statistics and history are compared bitwise."""
    x, y = _data()
    model = Net(nnx.Rngs(0), dropout=0.0)
    linen_vars = {"params": {"hidden": {"kernel": model.hidden.kernel[...], "bias": model.hidden.bias[...]},
                             "norm": {"scale": model.norm.scale[...], "bias": model.norm.bias[...]},
                             "out": {"kernel": model.out.kernel[...], "bias": model.out.bias[...]}},
                  "batch_stats": {"norm": {"mean": model.norm.mean[...], "var": model.norm.var[...]}}}
    linen = create_train_state(LinenTwin(), optax.adam(1e-2), (4,), jax.random.key(0))
    linen = linen.replace(params=linen_vars["params"], batch_stats=linen_vars["batch_stats"],
                          opt_state=optax.adam(1e-2).init(linen_vars["params"]))
    linen_state, linen_history = fit(None, x, y, state=linen, loss=CE, epochs=3, batch_size=32, verbose=0, seed=5)
    nnx_state, nnx_history = fit(model, x, y, loss=CE, optimizer=optax.adam(1e-2), epochs=3, batch_size=32,
                                 verbose=0, seed=5)
    assert nnx_history == linen_history
    for name in ("hidden", "out"):
        for leaf in ("kernel", "bias"):
            np.testing.assert_array_equal(np.asarray(nnx_state.params[name][leaf][...]),
                                          np.asarray(linen_state.params[name][leaf]))
    np.testing.assert_array_equal(np.asarray(nnx_state.batch_stats["norm"]["mean"][...]),
                                  np.asarray(linen_state.batch_stats["norm"]["mean"]))


def test_wrt_chooses_the_trained_variables():
    x, y = _data()
    model = Net(nnx.Rngs(0))
    frozen_kernel = np.asarray(model.hidden.kernel[...]).copy()
    only_out = nnx.All(nnx.Param, nnx.PathContains("out"))
    state, _ = fit(model, x, y, loss=CE, epochs=1, batch_size=32, verbose=0, wrt=only_out)
    np.testing.assert_array_equal(np.asarray(model.hidden.kernel[...]), frozen_kernel)
    assert sorted(state.params) == ["out"]


def test_summary_counts_an_nnx_modules_parameters_as_keras_does():
    lines = []
    totals = summary(Net(nnx.Rngs(0)), (4,), print_fn=lines.append)
    # hidden 4*16+16, norm scale and bias 2*16, out 16*3+3; batch statistics mean and var 2*16; rng state not counted
    assert totals == {"total": 80 + 32 + 51 + 32, "trainable": 80 + 32 + 51, "non_trainable": 32}
    assert lines[-3:] == ["Total params: 195", "Trainable params: 163", "Non-trainable params: 32"]


@pytest.mark.parametrize("precision, dtype", [("bfloat16", jnp.bfloat16), ("float16", jnp.float16)])
def test_half_precision_computes_in_it_and_keeps_float32_parameters(precision, dtype):
    x, y = _data()
    model = Net(nnx.Rngs(0))
    state, history = fit(model, x, y, loss=CE, epochs=2, batch_size=32, verbose=0, precision=precision)
    computing = trained_module(state)
    assert (computing.hidden.dtype, computing.norm.dtype, computing.out.dtype) == (dtype, dtype, dtype)
    assert model.hidden.dtype is None  # the user's module keeps its own dtype; it gets the trained variables
    assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert (state.dynamic_scale is not None) == (precision == "float16")  # float16 alone scales its loss
    assert np.isfinite(history["loss"]).all()
    assert predict(state, x[:4]).dtype == np.float32
    float32_state, _ = fit(Net(nnx.Rngs(0)), x, y, loss=CE, epochs=1, batch_size=32, verbose=0)
    halved = predict(float32_state, x, precision=precision)  # a float32 state predicting in half precision
    # Half precision's rounding, not float32's: measured 0.0161 (bfloat16) and 0.0035 (float16) at most on logits
    # up to 2.68 (Intel Xeon, jax 0.10.2); 0.1 leaves 6x room for other processors, and a run left in float32
    # (difference 0) fails.
    assert 0 < np.abs(halved - predict(float32_state, x)).max() < 0.1


def test_mc_predict_on_an_nnx_module_drops_in_evaluation_mode_reproducibly():
    """Monte-Carlo dropout on an NNX module: its nnx.Dropout layers drop, its BatchNorm stays on its running
    averages, each pass's masks from the key alone; the mean over many passes nears the deterministic prediction
    of a network whose dropout feeds a linear layer."""
    x, y = _data()
    model = Net(nnx.Rngs(0), dropout=0.5)
    state, _ = fit(model, x, y, loss=CE, epochs=2, batch_size=32, verbose=0)
    mean, std = mc_predict(None, state, x[:8], 64, 7)
    again, _ = mc_predict(model, None, x[:8], 64, 7)
    np.testing.assert_array_equal(mean, again)  # the same key: the same masks, from a state or the module
    assert mean.shape == std.shape == (8, 3) and (std > 0).all()
    other, _ = mc_predict(None, state, x[:8], 64, 8)
    assert not np.array_equal(mean, other)
    copy = nnx.clone(model)
    copy.eval()
    # Logits (loss=None): inverted dropout keeps each unit's expectation, and the layer after it is linear, so the
    # mean of 2,048 passes nears the deterministic logits; measured 0.0467 at most, against logits up to 1.92
    # (Intel Xeon, jax 0.10.2): 0.1 is about twice that (dropout left off is caught by `std > 0` above).
    wide, _ = mc_predict(model, None, x[:8], 2048, 0)
    assert np.abs(wide - np.asarray(copy(x[:8]))).max() < 0.1
    probabilities, _ = mc_predict(model, None, x[:8], 16, 0, loss=CE)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)  # probabilities averaged: they sum to 1


def test_a_train_flag_with_an_nnx_module_is_one_clear_error():
    x, y = _data()
    with pytest.raises(ValueError, match="train_flag='training' with a Flax NNX module"):
        fit(Net(nnx.Rngs(0)), x, y, loss=CE, train_flag="training", verbose=0)


class NoDtype(nnx.Module):
    """A module with a parameter of its own and no layer that takes a `dtype`."""

    def __init__(self):
        self.scale = nnx.Param(jnp.ones(4))

    def __call__(self, x):
        return x * self.scale[...]


def test_the_arguments_that_belong_to_one_family_are_refused_for_the_other_by_name(tmp_path):
    """`wrt` and `into` are NNX's, `input_shape`/`rng` and `variables` Linen's: each given to the other family, or
    missing where needed, is one error naming it."""
    from jaxdl import load_model, save_model

    x, y = _data()
    linen = LinenTwin()
    with pytest.raises(ValueError, match="wrt= chooses the trained variables of a Flax NNX module"):
        create_train_state(linen, optax.sgd(0.1), (4,), jax.random.key(0), wrt=nnx.Param)
    with pytest.raises(ValueError, match="wrt= chooses the trained variables of a Flax NNX module given as fit"):
        fit(linen, x, y, loss=CE, verbose=0, wrt=nnx.Param)
    with pytest.raises(ValueError, match=r"create_train_state\(LinenTwin\(...\), optimizer, input_shape, rng\)"):
        create_train_state(linen, optax.sgd(0.1))
    with pytest.raises(TypeError, match=r"a Linen module holds no variables; pass them"):
        save_model(tmp_path / "linen", linen)
    variables = linen.init(jax.random.key(0), x[:1])
    save_model(tmp_path / "linen", linen, variables)
    with pytest.raises(ValueError, match="fills a Flax NNX module, but .* holds a Linen model"):
        load_model(tmp_path / "linen", into=Net(nnx.Rngs(0)))
    save_model(tmp_path / "wide", Net(nnx.Rngs(0)))
    narrow = Net(nnx.Rngs(0))
    narrow.out = nnx.Linear(16, 2, rngs=nnx.Rngs(0))  # the same paths, another shape
    with pytest.raises(ValueError, match=r"out/bias has shape \(3,\), the module's \(2,\)"):
        load_model(tmp_path / "wide", into=narrow)
    with pytest.raises(ValueError, match="NoDtype has no layer with a `dtype` attribute"):
        fit(NoDtype(), x, y, loss="mse", precision="bfloat16", verbose=0)


def test_sources_weights_callbacks_and_validation_take_an_nnx_module(tmp_path):
    """The input, weighting and callback machinery does not look at the model: an NNX module gets all of it."""
    import grain

    from jaxdl import CSVLogger, EarlyStopping, ReduceLROnPlateau

    x, y = _data(128)
    source = grain.MapDataset.source([{"features": a, "label": b} for a, b in zip(x[:96], y[:96])])
    log = tmp_path / "log.csv"
    model = Net(nnx.Rngs(0))
    state, history = fit(model, source, features=("features", "label"), loss=CE, epochs=4, batch_size=32,
                         verbose=0, class_weight={0: 1.0, 1: 2.0, 2: 0.5}, validation_data=(x[96:], y[96:]),
                         optimizer=optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
                         callbacks=[EarlyStopping(patience=10), ReduceLROnPlateau(patience=1, factor=0.5),
                                    CSVLogger(str(log))])
    assert sorted(history) == ["accuracy", "learning_rate", "loss", "val_accuracy", "val_loss"]
    assert len(log.read_text().splitlines()) == 1 + len(history["loss"])
    unweighted, _ = fit(Net(nnx.Rngs(0)), source, features=("features", "label"), loss=CE, epochs=1,
                        batch_size=32, verbose=0)
    weighted, _ = fit(Net(nnx.Rngs(0)), source, features=("features", "label"), loss=CE, epochs=1,
                      batch_size=32, verbose=0, class_weight={0: 1.0, 1: 2.0, 2: 0.5})
    assert not np.array_equal(np.asarray(unweighted.params["out"]["bias"][...]),
                              np.asarray(weighted.params["out"]["bias"][...]))
    np.testing.assert_array_equal(np.asarray(model.out.kernel[...]), np.asarray(state.params["out"]["kernel"][...]))


def test_save_model_and_load_model_into_a_module_your_code_builds(tmp_path):
    """An NNX module's whole state saved (parameters, statistics, random streams, a variable of your own) and
    loaded into a module your code builds, as Flax's checkpointing guide restores into an abstract module."""
    from jaxdl import load_model, save_model

    x, y = _data()
    model = Counting(nnx.Rngs(0))
    fit(model, x, y, loss=CE, epochs=1, batch_size=32, verbose=0)
    save_model(tmp_path / "counting", model, metadata={"note": "one epoch"})
    fresh = Counting(nnx.Rngs(5))
    loaded, _, metadata = load_model(tmp_path / "counting", into=fresh)
    assert loaded is fresh and metadata == {"note": "one epoch"} and int(fresh.calls[...]) == 3
    np.testing.assert_array_equal(predict(fresh, x), predict(model, x))
    dropping = Net(nnx.Rngs(0))
    state, _ = fit(dropping, x, y, loss=CE, epochs=1, batch_size=32, verbose=0)
    save_model(tmp_path / "net", dropping, state.variables)  # a state's variables: the same module state
    back, _, _ = load_model(tmp_path / "net", into=Net(nnx.Rngs(9)))
    for a, b in zip(_leaves(nnx.state(back)), _leaves(nnx.state(dropping)), strict=True):
        np.testing.assert_array_equal(a, b)  # random streams' keys and counts included
    with pytest.raises(ValueError, match="holds a Flax NNX module .*pass one your code builds to fill"):
        load_model(tmp_path / "net")
    with pytest.raises(ValueError, match="holds a .*:Net, but into= is a .*:Counting"):
        load_model(tmp_path / "net", into=Counting(nnx.Rngs(0)))
    with pytest.raises(ValueError, match="of another module than the Net given"):
        save_model(tmp_path / "other", Counting(nnx.Rngs(0)))
        (tmp_path / "other" / "model.json").write_text((tmp_path / "net" / "model.json").read_text())
        load_model(tmp_path / "other", into=Net(nnx.Rngs(0)))


def test_model_checkpoint_saves_an_nnx_module_every_epoch(tmp_path):
    from jaxdl import ModelCheckpoint, load_model

    x, y = _data()
    state, _ = fit(Net(nnx.Rngs(0)), x[:64], y[:64], loss=CE, epochs=3, batch_size=32, verbose=0,
                   validation_data=(x[64:], y[64:]),
                   callbacks=[ModelCheckpoint(tmp_path / "last", save_best_only=False)])
    saved, _, metadata = load_model(tmp_path / "last", into=Net(nnx.Rngs(1)))
    assert metadata["epoch"] == 2  # the last epoch's save: the module the trained state holds
    np.testing.assert_array_equal(predict(saved, x), predict(state, x))


class NeedsAMask(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x, mask):
        return self.dense(x) * mask


def test_an_nnx_module_whose_call_needs_more_than_the_inputs_is_refused_before_tracing():
    x, y = _data()
    for call in (lambda: fit(NeedsAMask(nnx.Rngs(0)), x, y, loss=CE, verbose=0),
                 lambda: create_train_state(NeedsAMask(nnx.Rngs(0)), optax.sgd(0.1)),
                 lambda: predict(NeedsAMask(nnx.Rngs(0)), x)):
        with pytest.raises(TypeError, match=r"NeedsAMask.__call__ takes \(x, mask\), but jaxdl calls an NNX module "
                                            r"with the batch's inputs alone"):
            call()


def test_a_sweep_trains_a_new_nnx_module_per_configuration():
    """Each configuration builds its own module (an NNX module is trained in place), and each row is the metric
    of the same run made alone."""
    from jaxdl import sweep

    x, y = _data()

    def train(learning_rate):
        _, history = fit(Net(nnx.Rngs(0)), x, y, loss=CE, optimizer=optax.adam(learning_rate),
                         epochs=2, batch_size=32, verbose=0, validation_split=0.25)
        return {"val_loss": history["val_loss"][-1]}

    table = sweep(train, {"learning_rate": [0.05, 1e-4]}, verbose=False)
    assert [row["error"] for row in table.rows] == ["", ""]
    assert table.best_config == {"learning_rate": 0.05}  # 1e-4 barely moves in 2 epochs
    assert table.rows[1]["val_loss"] == train(1e-4)["val_loss"]  # bitwise: the module is new each time
