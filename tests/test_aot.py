"""Compiled programs cached on disk: reused, rebuilt when unreadable, keyed by what they depend on."""
import jax.numpy as jnp
import numpy as np
import optax
import jax

from jaxdl import aot, create_train_state, MLP, save_model
from jaxdl.checkpoint import fingerprint


def test_cached_program_is_reused_and_a_damaged_entry_rebuilt(tmp_path):
    weights = np.arange(6, dtype=np.float32).reshape(3, 2)
    forward = lambda x: jnp.tanh(x @ weights)  # noqa: E731 - weights become program constants
    x = np.ones((4, 3), np.float32)
    expected = np.tanh(x @ weights)
    first = aot.cached_program(forward, (x,), tmp_path, "k")
    np.testing.assert_allclose(np.asarray(first(x)), expected, rtol=1e-6)
    [entry] = tmp_path.glob("k.executable")

    def must_not_trace(x):
        raise AssertionError("a cached program was traced again")

    again = aot.cached_program(must_not_trace, (x,), tmp_path, "k")
    np.testing.assert_allclose(np.asarray(again(x)), expected, rtol=1e-6)
    entry.write_bytes(b"damaged")
    rebuilt = aot.cached_program(forward, (x,), tmp_path, "k")
    np.testing.assert_allclose(np.asarray(rebuilt(x)), expected, rtol=1e-6)
    assert entry.stat().st_size > 1000


def test_keys_change_with_the_inputs_they_name(tmp_path):
    assert aot.program_key("a", (1, 224, 224, 3)) == aot.program_key("a", (1, 224, 224, 3))
    assert aot.program_key("a", (1, 224, 224, 3)) != aot.program_key("a", (2, 224, 224, 3))
    model = MLP(features=(2,), num_outputs=2)
    state = create_train_state(model, optax.sgd(0.1), (3,), jax.random.key(0))
    save_model(tmp_path / "m", model, state.variables)
    before = fingerprint(tmp_path / "m")
    save_model(tmp_path / "m", model, state.variables, overwrite=True)
    assert fingerprint(tmp_path / "m") != before  # a re-saved model never reuses an old program
