"""The introductory tutorials' exact numbers."""
import jax
import jax.numpy as jnp

from experiments import basics, neuron
from jaxdl import MLP, ConvNet, count_params


def init(model, shape):
    return model.init(jax.random.key(0), jnp.zeros((1, *shape)))


def test_one_neuron_outputs_1_25():
    assert neuron.neuron_output() == 1.25


def test_two_hidden_units_compute_xor():
    assert neuron.xor_outputs() == [0.0, 1.0, 1.0, 0.0]


def test_rounding_network_has_34_parameters():
    assert count_params(init(basics.model(), (1,))) == 34


def test_penguin_network_has_83_parameters():
    assert count_params(init(MLP(features=(10,), num_outputs=3), (4,))) == 83


def test_mnist_mlp_has_101770_and_the_keras_cnn_34826_parameters():
    from experiments import mnist

    assert count_params(init(mnist.MLP_MODEL, (28, 28, 1))) == 101_770
    assert count_params(init(mnist.CNN_MODEL, (28, 28, 1))) == 34_826


def test_count_params_matches_keras_summary_with_batchnorm_and_convs():
    import keras

    mlp = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.BatchNormalization(),
                            keras.layers.Activation("relu"), keras.layers.Dense(3)])
    assert count_params(init(MLP(features=(8,), num_outputs=3, batch_norm=True), (4,))) == mlp.count_params()

    cnn = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
                            keras.layers.MaxPooling2D(2), keras.layers.BatchNormalization(),
                            keras.layers.Flatten(), keras.layers.Dropout(0.25), keras.layers.Dense(10)])
    ours = ConvNet(layers=(("conv", 32, 3), ("maxpool", 2), ("batchnorm",), ("flatten",), ("dropout", 0.25),
                           ("dense", 10)))
    assert count_params(init(ours, (8, 8, 1))) == cnn.count_params() == 5_578
