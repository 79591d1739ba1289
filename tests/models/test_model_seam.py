"""The model seam (`jaxdl.models.contract`): what a model says about itself, and what is refused by name.

A model's own `inference_form(variables)` hook is how model-specific inference
(MobileNetV2's folded BatchNorm and chunks) reaches `predict`; `model_family`
is the one place an entry point decides which family a model is of (Linen or NNX), or refuses it by name.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxdl import count_params, create_train_state, fit, predict, summary
from jaxdl.models.contract import InferenceForm, inference_form, model_family
from tests.support import tolerance


class Doubled(nn.Module):
    """A Dense whose inference form is the same layer with its kernel and bias doubled: outputs twice apply's."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(x)

    @nn.nowrap
    def inference_form(self, variables) -> InferenceForm:
        return InferenceForm(self, jax.tree.map(lambda leaf: 2 * leaf, variables))


def test_predict_runs_a_model_in_the_inference_form_its_hook_gives():
    model = Doubled()
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    variables = model.init(jax.random.key(0), x[:1])
    expected = 2 * np.asarray(model.apply(variables, x))  # the doubled layer is linear: twice the outputs
    tolerance.assert_close(predict(model, x, variables=variables), expected, tolerance.FEW_OPS)
    state = create_train_state(model, optax.sgd(0.1), (4,), jax.random.key(0))
    tolerance.assert_close(predict(state, x), 2 * np.asarray(model.apply(state.variables, x)), tolerance.FEW_OPS)


def test_a_model_without_the_hook_is_its_own_inference_form():
    model, variables = nn.Dense(2), {"params": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    form = inference_form(model, variables)
    assert (form.model, form.variables, form.chunked) == (model, variables, False)


class NNXLinear(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.linear(x)


class NotAFlaxModule:
    """What another library's module looks like to jaxdl: callable, with parameters, but no Flax module."""

    def __call__(self, x):
        return x


def _plain_function(x):
    return x


@pytest.mark.parametrize("given, says", [
    (NotAFlaxModule(), "takes a Flax module instance as its model .*got NotAFlaxModule"),
    (_plain_function, "takes a Flax module instance as its model .*got function"),
    (nn.Dense, "the class Dense, not a module: pass an instance"),
    (NNXLinear, "the class NNXLinear, not a module: pass an instance"),
])
def test_every_entry_point_refuses_what_is_not_a_flax_module_instance_by_name(given, says):
    x, y = np.zeros((8, 4), np.float32), np.zeros(8, np.int32)
    with pytest.raises(TypeError, match=f"fit\\(model, ...\\) .*{says}|fit\\(model, ...\\) {says}"):
        fit(given, x, y, loss="sparse_categorical_crossentropy", verbose=0)
    with pytest.raises(TypeError, match=f"create_train_state\\(model, ...\\) .*{says}|create_train_state.*{says}"):
        create_train_state(given, optax.sgd(0.1), (4,), jax.random.key(0))
    with pytest.raises(TypeError, match=f"predict\\(model, x, variables=...\\) .*{says}|predict.*{says}"):
        predict(given, x, variables={})
    with pytest.raises(TypeError, match=f"summary\\(model, ...\\) .*{says}|summary.*{says}"):
        summary(given, (4,), print_fn=lambda _: None)


def test_each_family_is_named_by_the_seam():
    assert model_family(nn.Dense(2), "fit(model, ...)") == "linen"
    assert model_family(NNXLinear(nnx.Rngs(0)), "fit(model, ...)") == "nnx"
    assert count_params({"params": {"kernel": jnp.ones((3, 2))}}) == 6
