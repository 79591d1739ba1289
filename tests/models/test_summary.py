"""`summary`: Flax's layer table and Keras's totals (BatchNorm statistics non-trainable)."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdl import summary
from jaxdl.models import MLP, ConvNet, MobileNetV2, count_params


def summarised(model, input_shape):
    lines = []
    totals = summary(model, input_shape, print_fn=lines.append)
    return totals, "\n".join(lines)


def variables_of(model, input_shape):
    return model.init(jax.random.key(0), jnp.zeros((1, *input_shape)), train=False)


def expected_totals(variables):
    trainable = count_params(variables["params"])
    return {"total": count_params(variables), "trainable": trainable,
            "non_trainable": count_params(variables) - trainable}


CONVNET = ConvNet(layers=(("conv", 8, 3), ("maxpool", 2), ("batchnorm",), ("flatten",), ("dropout", 0.25),
                          ("dense", 10)))


@pytest.mark.parametrize("model, input_shape, layers", [
    (MLP(features=(8,), num_outputs=2), (1,), ["dense_0", "logits"]),
    (MLP(features=(8, 4), num_outputs=3, batch_norm=True, dropout_rate=0.2), (4,),
     ["dense_0", "batch_norm_0", "dense_1", "batch_norm_1", "logits"]),
    (CONVNET, (8, 8, 1), ["conv_0", "batch_norm_2", "dense_5"]),
], ids=["tutorial-mlp", "mlp-batchnorm", "convnet"])
def test_totals_are_count_params_and_the_table_names_every_layer(model, input_shape, layers):
    totals, printed = summarised(model, input_shape)
    assert totals == expected_totals(variables_of(model, input_shape))
    for name in layers:
        assert f"│ {name} " in printed, name
    assert f"Total params: {totals['total']:,}\n" in printed
    assert f"Trainable params: {totals['trainable']:,}\n" in printed
    assert printed.endswith(f"Non-trainable params: {totals['non_trainable']:,}")


def test_the_tutorial_network_has_34_trainable_parameters():
    totals, printed = summarised(MLP(features=(8,), num_outputs=2), (1,))
    assert totals == {"total": 34, "trainable": 34, "non_trainable": 0}
    assert "float32[1,8]" in printed  # dense_0's output for a batch of one


def test_batchnorm_statistics_are_non_trainable_as_in_keras():
    totals, _ = summarised(MLP(features=(8,), num_outputs=3, batch_norm=True), (4,))
    # Dense 4->8 (40), BatchNorm scale and bias (16) and mean and variance (16), Dense 8->3 (27).
    assert totals == {"total": 99, "trainable": 83, "non_trainable": 16}


def test_mobilenet_v2_totals_match_keras(keras_mobilenet_v2):
    reference = keras_mobilenet_v2
    keras_trainable = int(sum(np.prod(w.shape) for w in reference.trainable_weights))
    model = MobileNetV2()
    with warnings.catch_warnings(record=True) as caught:  # the table records module calls: none may pass a
        warnings.simplefilter("always")                    # function where an array goes
        totals, printed = summarised(model, (224, 224, 3))
    assert not [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert totals == {"total": reference.count_params(), "trainable": keras_trainable,
                      "non_trainable": reference.count_params() - keras_trainable}
    assert totals["total"] == 3_538_984
    # The parameter count does not depend on the input size: count real variables at the smallest size.
    assert totals == expected_totals(jax.eval_shape(lambda: variables_of(model, (32, 32, 3))))
    for name in ["Conv1", "bn_Conv1", "expanded_conv_depthwise", "block_16_project_BN", "Conv_1_bn",
                 "predictions"]:
        assert f"│ {name} " in printed, name
    assert "float32[1,1000]" in printed


def test_the_table_is_plain_text_for_any_print_fn():
    _, printed = summarised(CONVNET, (8, 8, 1))
    assert "\x1b[" not in printed  # no terminal colour codes in a captured or logged summary


class _FlagModel:
    """Dense, Dropout and BatchNorm that follow the model's own train flag; a call in training mode raises,
    since `summary` describes the model as it runs for inference."""

    @staticmethod
    def layers(x, training: bool):
        import flax.linen as nn

        if training:
            raise ValueError("summary called the model in training mode")
        x = nn.Dense(4, name="dense")(x)
        x = nn.BatchNorm(use_running_average=not training, name="batch_norm")(x)
        return nn.Dropout(0.5, deterministic=not training)(x)


def _flag_models():
    import flax.linen as nn

    class Train(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = True):
            return _FlagModel.layers(x, train)

    class Training(nn.Module):
        @nn.compact
        def __call__(self, x, training: bool = True):
            return _FlagModel.layers(x, training)

    class Deterministic(nn.Module):
        @nn.compact
        def __call__(self, x, deterministic: bool):  # no default: the flag must be passed
            return _FlagModel.layers(x, not deterministic)

    class NoFlag(nn.Module):
        @nn.compact
        def __call__(self, x):
            return _FlagModel.layers(x, False)

    return [Train(), Training(), Deterministic(), NoFlag()]


@pytest.mark.parametrize("model", _flag_models(), ids=["train", "training", "deterministic", "no-flag"])
def test_summary_calls_models_by_their_own_train_flag_in_inference_mode(model):
    """Every flag `fit` accepts (jaxdl.models.contract): `train`, `training`, `deterministic` (inverted) or none, each
    model in inference mode (the defaults here are training mode, so a flag left out shows). Seen failing with
    `train=False` passed to every model: "TypeError: Training.__call__() got an unexpected keyword argument
    'train'" (and for Deterministic and NoFlag)."""
    totals, printed = summarised(model, (3,))
    # Dense 3->4 (16), BatchNorm scale and bias (8) trainable; its mean and variance (8) not.
    assert totals == {"total": 32, "trainable": 24, "non_trainable": 8}
    for name in ["dense", "batch_norm"]:
        assert f"│ {name} " in printed, name
    assert "float32[1,4]" in printed


def test_summary_takes_the_flag_named_by_train_flag():
    """`train_flag` as in `fit`: a name the signature does not give away (or None: no flag passed)."""
    import flax.linen as nn

    class Odd(nn.Module):
        @nn.compact
        def __call__(self, x, is_training: bool = True, **unused):
            return _FlagModel.layers(x, is_training)

    with pytest.raises(ValueError, match=r"takes \*\*kwargs"):
        summarised(Odd(), (3,))
    lines = []
    totals = summary(Odd(), (3,), print_fn=lines.append, train_flag="is_training")
    assert totals == {"total": 32, "trainable": 24, "non_trainable": 8}
