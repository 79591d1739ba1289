"""jaxdl's steps as a Flax or Keras user meets them: their own models and states, their mistakes named."""
import functools
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

from jaxdl import MLP, ConvNet, create_train_state, data, evaluate, fit, make_eval_step, make_train_step, predict
from jaxdl.training.trainer import example_weights, prediction_batch_size
from tests.support import tolerance
from tests.support.toy_data import CE, blobs as toy_blobs

blobs = functools.partial(toy_blobs, 40)

def readme_flax_example() -> str:
    """The README's flax-examples-style training loop, read from README.md so the two never drift apart."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    after = readme.split("A flax-examples-style model and state in a hand-written loop", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_flax_example_trains_in_a_hand_written_loop(capsys):
    # Run as a script in a namespace of its own, in this process (a new Python process cost 2 s of start-up).
    exec(compile(readme_flax_example(), "README.md (flax example)", "exec"), {"__name__": "__main__"})
    metrics = eval(capsys.readouterr().out.strip().splitlines()[-1])  # a dict of floats printed by the example
    assert metrics["accuracy"] >= 0.9  # separable by the mean: 1.0 here (loss 0.065), a band for other CPUs


def test_a_plain_flax_state_without_batch_statistics_or_key():
    x, y = blobs()
    model = MLP(features=(8,), num_outputs=3)
    params = model.init(jax.random.key(0), x[:1])["params"]
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1))
    step = make_train_step(CE)
    losses = []
    for _ in range(5):
        state, sums = step(state, {"x": x, "y": y})
        losses.append(float(sums["loss"]))
    assert losses[-1] < losses[0] and int(state.step) == 5


def test_a_user_loss_sees_the_whole_batch():
    x, y = blobs()
    state = create_train_state(MLP(features=(8,), num_outputs=3), optax.sgd(0.0), (3,), jax.random.key(0))

    def halved_cross_entropy(logits, batch):
        return 0.5 * optax.softmax_cross_entropy_with_integer_labels(logits, batch["target"])

    step = make_train_step(halved_cross_entropy, metrics=(), label_key="target", jit=False)
    _, ours = step(state, {"x": x, "target": y})
    _, named = make_train_step(CE, metrics=(), jit=False)(state, {"x": x, "y": y})
    tolerance.assert_close(ours["loss"], 0.5 * named["loss"], tolerance.ONE_OP)


def test_a_consumed_state_is_one_clear_error():
    x, y = blobs()
    state = create_train_state(MLP(features=(8,), num_outputs=3), optax.sgd(0.1), (3,), jax.random.key(0))
    step = make_train_step(CE)
    new_state, _ = step(state, {"x": x, "y": y})
    with pytest.raises(ValueError, match="already used by an earlier train step.*continue from the state it returned"):
        step(state, {"x": x, "y": y})
    step(new_state, {"x": x, "y": y})


def test_a_model_without_the_train_flag_is_named():
    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(x)

    x, y = blobs()
    params = Plain().init(jax.random.key(0), x[:1])["params"]
    state = train_state.TrainState.create(apply_fn=Plain().apply, params=params, tx=optax.sgd(0.1))
    with pytest.raises(ValueError, match="does not take the keyword 'train'.*train_flag=None"):
        make_train_step(CE, train_flag="train")(state, {"x": x, "y": y})
    state, _ = make_train_step(CE)(state, {"x": x, "y": y})  # "auto" reads that it takes no flag
    make_train_step(CE, train_flag=None)(state, {"x": x, "y": y})


def test_batch_keys_that_are_not_there_are_named():
    x, y = blobs()
    state = create_train_state(MLP(features=(8,), num_outputs=3), optax.sgd(0.1), (3,), jax.random.key(0))
    with pytest.raises(ValueError, match=r"reads batch\['x'\].*batch\['y'\].*has \['image', 'label'\].*input_key="):
        make_train_step(CE)(state, {"image": x, "label": y})


def test_one_hot_labels_with_sparse_cross_entropy_name_the_right_loss():
    x, y = blobs()
    with pytest.raises(ValueError, match=r"y has shape \(40, 3\): one-hot labels.*categorical_crossentropy"):
        fit(MLP(features=(4,), num_outputs=3), x, np.eye(3)[y], loss=CE, verbose=0)
    with pytest.raises(ValueError, match=r"categorical_crossentropy takes one-hot labels of shape \(N, 3\)"):
        fit(MLP(features=(4,), num_outputs=3), x, y, loss="categorical_crossentropy", verbose=0)


def test_a_conv_model_given_examples_without_channels_names_the_shape():
    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Conv(4, (3, 3))(x)
            return nn.Dense(3)(x.reshape((x.shape[0], -1)))

    x = np.zeros((10, 8, 8), np.float32)
    with pytest.raises(ValueError, match=r"CNN has 2-D convolutions .*examples have shape \(8, 8\).*channel axis"):
        fit(CNN(), x, np.zeros(10, np.int32), loss=CE, verbose=0)
    # jaxdl's ConvNet adds the channel axis itself
    fit(ConvNet(layers=(("conv", 4, 3), ("flatten",), ("dense", 3))), x, np.zeros(10, np.int32), loss=CE, verbose=0)


def test_evaluate_checks_labels_and_predict_says_predicting():
    x, y = blobs()
    state, _ = fit(MLP(features=(4,), num_outputs=3), x, y, loss=CE, verbose=0)
    with pytest.raises(ValueError, match="y holds classes 3..5, but the model has 3 outputs"):
        evaluate(state, x, y + 3, loss=CE)
    with pytest.raises(ValueError, match="before predicting"):
        predict(state, np.where(np.arange(x.size).reshape(x.shape) == 4, np.nan, x))


@pytest.mark.parametrize("source, message", [
    (lambda x: (row for row in x), "a source carries its labels; name them with features"),
    (lambda x: {"image": x}, r"x is a dict of feature arrays \(\['image'\]\).*x=features\[input name\]")],
    ids=["generator with y", "features dict"])
def test_sources_with_separate_labels_and_dicts_of_columns_are_clear_errors(source, message):
    x, y = blobs()
    with pytest.raises(ValueError, match=message):
        fit(MLP(features=(4,), num_outputs=3), source(x), y, loss=CE, verbose=0)


def test_fit_refuses_an_optimizer_that_contradicts_the_state():
    x, y = blobs()
    state, _ = fit(MLP(features=(4,), num_outputs=3), x, y, loss=CE, optimizer=optax.adam(1e-3), verbose=0)
    with pytest.raises(ValueError, match=r"continues with the optimizer the state was built with \(state.tx\)"):
        fit(None, x, y, loss=CE, state=state, optimizer=optax.sgd(0.1), verbose=0)


def test_predict_on_four_images_compiles_for_four_not_256():
    seen = []

    class Recording(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            seen.append(x.shape[0])  # runs while tracing: the compiled batch size
            return nn.Dense(2)(x)

    variables = Recording().init(jax.random.key(0), jnp.zeros((1, 3)))
    seen.clear()
    assert predict(Recording(), np.ones((4, 3), np.float32), variables=variables).shape == (4, 2)
    assert seen == [4]
    assert [prediction_batch_size(n, 256) for n in (1, 4, 5, 200, 300)] == [1, 4, 8, 256, 256]


def test_predict_runs_mobilenet_in_its_fast_form(monkeypatch):
    """Routing only: the fast form's numbers are checked against the plain one in pretrained/test_classifier."""
    from jaxdl.models import MobileNetV2
    from jaxdl.models.mobilenet_v2 import folded
    from jaxdl.training import trainer as driver

    model = MobileNetV2(alpha=0.35, include_top=True, num_classes=3, classifier_activation=None)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    variables = jax.tree.map(lambda leaf: np.ones(leaf.shape, leaf.dtype), shapes)  # values do not matter here
    calls = []
    monkeypatch.setattr(driver, "predict_all", lambda apply_fn, variables, x, size, chunked, mesh, **_: calls.append(
        (apply_fn.__self__, set(variables), size, chunked)) or np.zeros((len(x), 3)))
    predict(model, np.zeros((3, 32, 32, 3), np.float32), variables=variables)
    fast_model, _ = folded(model, variables)
    assert calls == [(fast_model, {"params"}, 4, True)]  # BatchNorm folded away, chunked, 3 -> 4


def keras_twin(state):
    """The same MLP in Keras 3, with our weights."""
    import keras

    params = jax.device_get(state.params)
    net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)])
    net.set_weights([params["dense_0"]["kernel"], params["dense_0"]["bias"],
                     params["logits"]["kernel"], params["logits"]["bias"]])
    net.compile(optimizer=keras.optimizers.SGD(0.0), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return net


def test_class_and_sample_weights_weigh_the_loss_as_keras_does():
    x, y = blobs()
    model = MLP(features=(8,), num_outputs=3)
    from jaxdl.training.steps import seed_rngs

    twin = keras_twin(create_train_state(model, optax.sgd(0.0), (3,), seed_rngs(0)[0]))
    unweighted = fit(model, x, y, loss=CE, metrics=(), optimizer=optax.sgd(0.0), batch_size=len(y), verbose=0)[1]
    for weights in ({"sample_weight": np.linspace(0.5, 2.0, len(y)).astype(np.float32)},
                    {"class_weight": {0: 1.0, 1: 3.0, 2: 0.5}}):
        # One batch, learning rate 0: the first epoch's loss is the weighted loss of the initial weights.
        _, ours = fit(model, x, y, loss=CE, metrics=(), optimizer=optax.sgd(0.0), batch_size=len(y), verbose=0,
                      **weights)
        keras_history = twin.fit(x, y, batch_size=len(y), epochs=1, verbose=0, shuffle=False, **weights).history
        # the same float32 loss summed in another order by another framework
        tolerance.assert_close(ours["loss"][0], keras_history["loss"][0], tolerance.FEW_OPS, str(weights))
        assert abs(ours["loss"][0] - unweighted["loss"][0]) > 0.05  # the weights matter
    with pytest.raises(ValueError, match="pass class_weight or sample_weight, not both"):
        example_weights(y, {0: 1.0, 1: 1.0, 2: 1.0}, np.ones(len(y)))
    with pytest.raises(ValueError, match=r"class_weight has no weight for classes \[2\]"):
        example_weights(y, {0: 1.0, 1: 1.0}, None)
    with pytest.raises(ValueError, match=r"sample_weight must hold one finite weight per example, shape \(40,\)"):
        example_weights(y, None, np.ones(3))


@pytest.mark.parametrize("verbose, lines", [(0, 0), (2, 3)])
def test_verbose_two_prints_one_line_per_epoch(capsys, verbose, lines):
    x, y = blobs()
    fit(MLP(features=(4,), num_outputs=3), x, y, loss=CE, epochs=3, verbose=verbose)
    out = capsys.readouterr()
    printed = [line for line in out.out.splitlines() if line.startswith("Epoch ")]
    assert len(printed) == lines and "\r" not in out.err
    if lines:
        assert printed[0].startswith("Epoch 1/3 - loss: ") and " - accuracy: " in printed[0]


def test_an_unknown_verbose_value_is_named():
    x, y = blobs()
    with pytest.raises(ValueError, match="verbose must be 0, 1, 2 or 'auto', got 3"):
        fit(MLP(features=(4,), num_outputs=3), x, y, loss=CE, verbose=3)


def test_padded_batches_are_the_default_and_unpadded_batches_end_smaller():
    x, y = toy_blobs(10)
    assert [len(b["x"]) for b in data.batches(x, y, 4, pad=False)] == [4, 4, 2]
    assert all("mask" not in b for b in data.batches(x, y, 4, pad=False))
    assert [int(b["mask"].sum()) for b in data.batches(x, y, 4)] == [4, 4, 2]


def test_conv_net_and_dense_models_keep_working_with_the_default_contract():
    x = np.random.default_rng(0).normal(size=(16, 6, 6, 1)).astype(np.float32)
    y = (x.mean(axis=(1, 2, 3)) > 0).astype(np.int32)
    model = ConvNet(layers=(("conv", 4, 3), ("flatten",), ("dense", 2)))
    state, history = fit(model, x, y, loss=CE, epochs=2, batch_size=8, verbose=0)
    sums = make_eval_step(CE)(state, {"x": x, "y": y})
    assert len(history["loss"]) == 2 and float(sums["count"]) == 16


def test_a_model_that_needs_a_key_without_one_is_told_how_to_give_it():
    class WithDropout(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            return nn.Dense(3)(nn.Dropout(0.5, deterministic=not train)(x))

    x, y = blobs()
    params = WithDropout().init(jax.random.key(0), x[:1], train=False)["params"]
    state = train_state.TrainState.create(apply_fn=WithDropout().apply, params=params, tx=optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"draws random numbers.*pass rng=\.\.\. to the step"):
        make_train_step(CE)(state, {"x": x, "y": y})
    state, _ = make_train_step(CE)(state, {"x": x, "y": y}, jax.random.key(1))
    assert int(state.step) == 1
