"""Models on integer tokens (`nn.Embed`): the input dtype comes from the data, for the state, checks and steps."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxdl import create_train_state, evaluate, fit, load_model, predict, save_model
from tests.support.toy_data import CE


class TextClassifier(nn.Module):
    """Token ids (batch, length) -> class logits: an embedding averaged over the sequence, then a dense layer."""

    vocab_size: int = 20
    width: int = 8
    num_classes: int = 3

    @nn.compact
    def __call__(self, tokens):
        return nn.Dense(self.num_classes)(nn.Embed(self.vocab_size, self.width)(tokens).mean(axis=1))


class NNXTextClassifier(nnx.Module):
    """The same classifier as a Flax NNX module."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(20, 8, rngs=rngs)
        self.dense = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, tokens):
        return self.dense(self.embed(tokens).mean(axis=1))


def tokens(n=48, length=12, seed=0):
    """Sequences of 12 token ids from 20 (int64, numpy's default), each labelled by its first token mod 3."""
    ids = np.random.default_rng(seed).integers(0, 20, (n, length))
    return ids, (ids[:, 0] % 3).astype(np.int32)


def test_an_embedding_model_trains_evaluates_predicts_resumes_and_saves(tmp_path):
    x, y = tokens()
    model = TextClassifier()
    options = dict(loss=CE, batch_size=16, seed=1, verbose=0, optimizer=optax.adam(0.05))
    state, history = fit(model, x, y, epochs=2, validation_data=(x[:16], y[:16]), **options)
    # The examples are learnable (the label is the first token's class): the training loss falls.
    assert history["loss"][1] < history["loss"][0] and np.isfinite(history["val_loss"]).all()
    assert state.params["Embed_0"]["embedding"].shape == (20, 8)

    scores = evaluate(state, x, y, loss=CE)
    outputs = predict(state, x, batch_size=16)  # in 3 batches: which loop runs them is decided from a trace too
    assert outputs.shape == (48, 3)
    # evaluate's accuracy is that of predict's outputs: the same model on the same integer inputs.
    assert scores["accuracy"] == np.mean(outputs.argmax(axis=1) == y)

    # A run stopped after its first epoch and called again with the same checkpoint_dir ends where the
    # uninterrupted run did, bitwise.
    fit(model, x, y, epochs=1, checkpoint_dir=tmp_path / "run", **options)
    resumed, resumed_history = fit(model, x, y, epochs=2, checkpoint_dir=tmp_path / "run", **options)
    assert resumed_history["loss"] == history["loss"]
    jax.tree.map(np.testing.assert_array_equal, resumed.params, state.params)

    save_model(tmp_path / "model", model, state.variables)
    loaded, variables, _ = load_model(tmp_path / "model", custom_classes=[TextClassifier])
    np.testing.assert_array_equal(predict(loaded, x, variables=variables, batch_size=16), outputs)


def test_a_state_built_for_integer_inputs_and_a_source_of_token_features_train():
    x, y = tokens()
    state = create_train_state(TextClassifier(), optax.adam(0.05), (12,), jax.random.key(0), input_dtype=jnp.int32)
    _, history = fit(None, x, y, state=state, loss=CE, epochs=1, batch_size=16, verbose=0)
    assert np.isfinite(history["loss"]).all()
    source = [{"tokens": row, "label": label} for row, label in zip(x.astype(np.int32), y)]
    trained, history = fit(TextClassifier(), source, features=("tokens", "label"), loss=CE, epochs=1, batch_size=16,
                           verbose=0)
    assert np.isfinite(history["loss"]).all() and trained.params["Embed_0"]["embedding"].shape == (20, 8)


def test_an_nnx_embedding_module_trains_on_integer_inputs():
    x, y = tokens()
    model = NNXTextClassifier(nnx.Rngs(0))
    state, history = fit(model, x, y, loss=CE, epochs=2, batch_size=16, verbose=0, optimizer=optax.adam(0.05))
    assert history["loss"][1] < history["loss"][0]
    assert evaluate(state, x, y, loss=CE)["accuracy"] == np.mean(predict(model, x).argmax(axis=1) == y)


def test_summary_traces_an_embedding_model_on_integer_inputs():
    """Keras's count for both families: 20 x 8 embedding weights, then 8 x 3 + 3. Before: float32 zeros only,
    which nn.Embed refuses."""
    from jaxdl import summary

    lines = []
    for model in (TextClassifier(), NNXTextClassifier(nnx.Rngs(0))):
        totals = summary(model, (12,), input_dtype=jnp.int32, print_fn=lines.append)
        assert totals == {"total": 20 * 8 + 8 * 3 + 3, "trainable": 20 * 8 + 8 * 3 + 3, "non_trainable": 0}
