"""MobileNetV2: parity with keras.applications on every file layout, counts, names, fast paths."""
import functools
import shutil

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import strategies as st

from jaxdl.models import MobileNetV2, MobileNetV2NNX, count_params
from jaxdl.models.mobilenet_v2 import MobileNetConv, correct_pad, folded, layer_plan, make_divisible
from jaxdl.pretrained.convert import ConversionError, from_keras
from tests.project.test_fuzz_loaders import THOROUGH, assert_names_the_file, damage, fuzz, mutated, write
from tests.support import tolerance
from tests.support.keras_reference import CONFIGS


def keras_tolerance(expected: np.ndarray) -> "tolerance.Tolerance":
    """Logits (the reference models' top has no softmax) and features, relative to their size (they reach ~10)."""
    return tolerance.cross_framework_activations(np.abs(expected).max())


def softmax64(logits: np.ndarray) -> np.ndarray:
    """The softmax in float64 numpy: the reference probabilities from Keras's logits."""
    shifted = np.exp(logits.astype(np.float64) - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_outputs_and_every_blocks_output_match_keras(converted_models, name):
    """Logits, probabilities, and block by block as jax-resnet's parity tests do: a divergence is located.

    The reference has a random N(0, 1) classifier bias and is compared on logits: seen failing with the
    converter's Dense bias replaced by zeros (a0.35-96-top-legacy: probabilities off by 0.0155), which the
    former reference, whose bias Keras had initialised to zeros, agreed with.
    """
    config, model, variables, images, expected, keras_blocks, _ = converted_models(name)
    assert model.alpha == config["alpha"] and model.include_top == config["include_top"]
    ours, state = jax.jit(functools.partial(model.apply, capture_intermediates=True))(variables, images)
    intermediates = state["intermediates"]
    if config["include_top"]:  # the model's softmax output, and the logits before it
        tolerance.assert_close(ours, softmax64(expected), tolerance.CROSS_FRAMEWORK_PROBABILITIES, "probabilities")
        ours = intermediates["predictions"]["__call__"][0]
    assert ours.shape == expected.shape
    tolerance.assert_close(ours, expected, keras_tolerance(expected))
    for block, reference in keras_blocks.items():
        value = intermediates[block]["__call__"][0] if block != "out_relu" else jax.nn.relu6(
            intermediates["Conv_1_bn"]["__call__"][0])
        tolerance.assert_close(value, reference, tolerance.cross_framework_activations(np.abs(reference).max()),
                               block)


# jaxdl's CPU convolutions (matmul) on every config; lax's (the GPU/TPU default, the same code for any
# config) on one config with the top and one without.
@pytest.mark.parametrize("name, implementation", [(name, "matmul") for name in sorted(CONFIGS)] + [
    ("a0.35-96-top-legacy", "xla"), ("a1.4-160-max-legacy", "xla")])
def test_folded_batchnorm_and_both_conv_implementations_match_keras(converted_models, name, implementation):
    """Compared on logits: seen failing with the running mean left out of the folded bias (a1.4-160-max-legacy,
    xla: features off by 0.667).

    With matmul convs on an odd and an even size, as `jaxdl classify` runs the network on CPU:
    `part="body"` with blocks in row strips (block 1 in strips of 5 rows, and block 2, stride 1 with a
    residual, in strips of 7: uneven at both sizes, and Keras pads stride-2 blocks only below and right
    on even sizes), then `part="top"`.
    """
    config, model, variables, images, expected, _, _ = converted_models(name)
    logits_model = model.clone(conv_implementation=implementation, classifier_activation=None)
    fast_model, fast_variables = folded(logits_model, variables)
    assert "batch_stats" not in fast_variables
    if implementation == "xla" or name not in ("a0.5-97-features-model.h5", "a1.0-160-top-keras"):
        ours = np.asarray(jax.jit(fast_model.apply)(fast_variables, images))
    else:
        body = jax.jit(lambda v, x: fast_model.apply(v, x, part="body", row_strips=((1, 5), (2, 7))))
        ours = np.asarray(jax.jit(lambda v, x: fast_model.apply(v, x, part="top"))(
            fast_variables, body(fast_variables, images)))
    tolerance.assert_close(ours, expected, keras_tolerance(expected))


def test_keras_weights_as_an_nnx_module_give_the_linen_ports_logits(converted_models):
    """Keras's weights through `MobileNetV2NNX` (tests/models/test_nnx_mobilenet_v2.py has torchvision's)."""
    config, model, variables, images, expected, _, _ = converted_models("a0.35-96-top-legacy")
    logits_model = model.clone(classifier_activation=None)
    module = MobileNetV2NNX(logits_model, variables)
    module.eval()
    ours = np.asarray(nnx.jit(lambda m, x: m(x))(module, images))
    # Bitwise: the bridge runs the Linen module's own apply on the same variables.
    np.testing.assert_array_equal(ours, np.asarray(jax.jit(logits_model.apply)(variables, images)))
    tolerance.assert_close(ours, expected, keras_tolerance(expected))


def test_keras_shape_mismatch_names_the_layer(tmp_path, converted_models):
    path = tmp_path / "broken.h5"
    shutil.copy(converted_models("a0.35-96-top-legacy")[-1], path)
    with h5py.File(path, "r+") as file:
        layer = file["mobl3_conv_3_depthwise"]
        name = layer.attrs["weight_names"][0]
        name = name.decode() if isinstance(name, bytes) else name
        channels = layer[name].shape[2]
        del layer[name]
        layer.create_dataset(name, data=np.zeros((5, 5, channels, 1), np.float32))
    with pytest.raises(ConversionError, match=rf"layer #\d+ 'mobl3_conv_3_depthwise' has kernel of shape "
                                              rf"\(5, 5, 1, {channels}\), but MobileNetV2\(alpha=0.35\) layer "
                                              rf"'block_3_depthwise' needs \(3, 3, 1, {channels}\)"):
        from_keras(path)


def test_parameter_count_and_layer_names_match_keras(keras_mobilenet_v2):
    reference = keras_mobilenet_v2
    variables = jax.eval_shape(MobileNetV2().init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    assert count_params(variables) == reference.count_params() == 3_538_984
    assert len(reference.layers) == 156  # 157 counting the input, as the tutorials do
    keras_names = [layer.name for layer in reference.layers if layer.weights]
    assert [name for name, _ in layer_plan()] == keras_names
    assert set(variables["params"]) == set(keras_names)


def test_make_divisible_and_correct_pad_follow_keras():
    assert [make_divisible(32 * a) for a in (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)] == [16, 16, 24, 32, 40, 48]
    assert make_divisible(1280 * 1.4) == 1792
    assert correct_pad((224, 224)) == ((0, 1), (0, 1))
    assert correct_pad((7, 7)) == ((1, 1), (1, 1))


def test_bad_inputs_are_named():
    model = MobileNetV2(alpha=0.35)
    with pytest.raises(ValueError, match="at least 32x32, got 31x64"):
        model.init(jax.random.key(0), jnp.zeros((1, 31, 64, 3)))
    with pytest.raises(ValueError, match="3 channels, got shape \\(1, 64, 64, 1\\)"):
        model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 1)))
    with pytest.raises(ValueError, match="pooling must be None, 'avg' or 'max', got 'mean'"):
        MobileNetV2(include_top=False, pooling="mean").init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="part must be 'all', 'body' or 'top', got 'head'"):
        model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), part="head")


@pytest.mark.parametrize("features, kernel, stride, depthwise, channels", [
    (6, 3, 1, True, 6),  # blocks 0, 2, ...: the rows-of-width-times-channels form
    (6, 3, 2, True, 6),  # blocks 1, 3, ...: strided windows
    (8, 3, 2, False, 3),  # the stem: a multiply-add per tap and channel
    (8, 3, 2, False, 5),  # more channels than that: patches and one product
    (8, 1, 2, False, 6),  # a strided 1x1: one product
])
def test_each_cpu_form_of_a_conv_gives_laxs_convolution(features, kernel, stride, depthwise, channels):
    """`MobileNetConv`'s CPU forms against `lax.conv_general_dilated`, on an odd, non-square image, with padding."""
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 13, 10, channels)), jnp.float32)
    padding = ((1, 1), (0, 1)) if kernel == 3 else ((0, 0), (0, 0))
    forms = {implementation: MobileNetConv(features, kernel, stride, padding, depthwise=depthwise, use_bias=True,
                                  implementation=implementation) for implementation in ("matmul", "xla")}
    variables = jax.tree.map(lambda leaf: np.random.default_rng(1).normal(size=leaf.shape).astype(np.float32),
                             forms["xla"].init(jax.random.key(0), images))
    outputs = {name: jax.jit(form.apply)(variables, images) for name, form in forms.items()}
    size = (13, 9) if stride == 1 else (7, 5)  # 13x10 padded to 15x11 (or not, 1x1), 3x3 windows
    assert outputs["matmul"].shape == outputs["xla"].shape == (2, *size, channels if depthwise else features)
    # the same products, summed in another order: a few roundings apart (sums of 9 to 54 products)
    tolerance.assert_close(outputs["matmul"], outputs["xla"], tolerance.FEW_OPS)


def test_blocks_in_row_strips_give_the_whole_blocks_output():
    """Block 1 (stride 2; Keras pads it only below and right at this even size) in strips of 5 of its 16
    output rows, block 2 (stride 1, a residual) in strips of 7: uneven strips, compared on block 16's output.
    Random weights, N(0, 0.5): the converted models' features hardly move when a strip reads the wrong rows."""
    model = MobileNetV2(alpha=0.35, include_top=False, fold_bn=True)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float32)
    rng = np.random.default_rng(1)
    variables = jax.tree.map(lambda leaf: rng.normal(0, 0.5, leaf.shape).astype(np.float32),
                             jax.eval_shape(model.init, jax.random.key(0), images))
    whole, strips = (jax.jit(lambda v, x: model.apply(v, x, part="body", row_strips=plan))(variables, images)
                     for plan in ((), ((1, 5), (2, 7))))
    assert whole.shape == (2, 2, 2, 112)  # 64 pixels over 5 stride-2 layers; 320 * 0.35 channels
    # the same ops, some on fewer rows: XLA may pick other kernels
    tolerance.assert_close(strips, whole, tolerance.FEW_OPS)


def test_row_strips_are_for_inference_and_name_real_blocks():
    model = MobileNetV2(alpha=0.35)
    images = jnp.zeros((1, 32, 32, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    with pytest.raises(ValueError, match="row_strips is for inference"):
        jax.eval_shape(lambda v: model.apply(v, images, train=True, row_strips=((1, 4),), mutable=["batch_stats"]),
                       variables)
    for bad in (((17, 4),), ((1, 0),), ((1,),), ((1, 2.5),)):
        with pytest.raises(ValueError, match=r"row_strips takes pairs \(block, rows\) with a block in 0..16 and at "
                                             r"least 1 row, got "):
            jax.eval_shape(lambda v: model.apply(v, images, row_strips=bad), variables)


def test_a_mesh_for_chunked_inference_needs_a_data_axis():
    from jax.sharding import Mesh

    from jaxdl.runtime.inference import apply_in_chunks

    with pytest.raises(ValueError, match="the mesh has axes \\('model',\\) but no 'data' axis"):
        apply_in_chunks(lambda v, x: x, {}, jnp.zeros((2, 3)), mesh=Mesh(np.asarray(jax.devices()), ("model",)))


def test_chunked_inference_equals_one_piece():
    """Chunking is model-agnostic (each image's output depends on that image alone in inference):
    a small conv net checks its padding and reassembly in seconds, where MobileNetV2 took half a minute."""
    from jaxdl.models import ConvNet
    from jaxdl.runtime.inference import apply_in_chunks

    model = ConvNet(layers=(("conv", 4, 3), ("batchnorm",), ("maxpool", 2), ("flatten",), ("dense", 10)))
    images = jnp.asarray(np.random.default_rng(0).normal(size=(5, 8, 8, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), images)
    whole = jax.jit(model.apply)(variables, images)
    for chunk, streams in [(2, 1), (2, 2), (1, 3), (4, 2)]:  # 5 images padded to 6, 8, 6 and 8
        chunked = jax.jit(lambda v, x: apply_in_chunks(model.apply, v, x, chunk, streams))(variables, images)
        assert chunked.shape == (5, 10)
        # the same few ops on other batch sizes: XLA may pick other kernels
        tolerance.assert_close(chunked, whole, tolerance.FEW_OPS, f"{chunk}x{streams}")


def layer_edits(genuine: bytes, edit: str, seed: int, tmp_path):
    """The genuine file with one layer removed, one added, or one weight reshaped."""
    path = write(tmp_path, "edited.h5", genuine)
    rng = np.random.default_rng(seed)
    with h5py.File(path, "r+") as file:
        names = [name.decode() if isinstance(name, bytes) else name for name in file.attrs["layer_names"]]
        with_weights = [name for name in names if len(file[name].attrs["weight_names"])]
        name = with_weights[int(rng.integers(0, len(with_weights)))]
        if edit == "remove layer":
            file.attrs["layer_names"] = [n.encode() for n in names if n != name]
        elif edit == "extra layer":
            extra = file.create_group("extra_dense")
            extra.attrs["weight_names"] = [b"extra_dense/kernel:0"]
            extra.create_dataset("extra_dense/kernel:0", data=np.zeros((3, 3), np.float32))
            names.insert(int(rng.integers(0, len(names))), "extra_dense")
            file.attrs["layer_names"] = [n.encode() for n in names]
        else:  # reshape one weight
            weight = file[name].attrs["weight_names"][0]
            weight = weight.decode() if isinstance(weight, bytes) else weight
            values = file[name][weight][...]
            del file[name][weight]
            file[name].create_dataset(weight, data=np.zeros(values.shape + (2,), values.dtype))
    return path.read_bytes()


h5_cases = st.one_of(st.tuples(st.just("bytes"), damage),
                     st.tuples(st.sampled_from(["remove layer", "extra layer", "reshape weight"]),
                               st.integers(0, 2**32 - 1)))


# A Keras file that survives its damage is converted whole (1.8 s an example in the slow run), so the
# default suite runs few.
@pytest.mark.parametrize("examples", [3, pytest.param(THOROUGH, marks=pytest.mark.slow)], ids=["quick", "thorough"])
def test_damaged_keras_files_convert_or_raise_a_conversion_error_naming_the_file(tmp_path, converted_models,
                                                                                  examples):
    """Fuzzed as tests/project/test_fuzz_loaders.py fuzzes the other loaders, on the legacy file of one parity
    config."""
    genuine_h5 = converted_models("a0.35-96-top-legacy")[-1].read_bytes()

    def check(case):
        kind, detail = case
        content = mutated(genuine_h5, *detail) if kind == "bytes" else layer_edits(genuine_h5, kind, detail, tmp_path)
        path = write(tmp_path, "weights.h5", content)
        try:
            model, variables = from_keras(path)
        except ConversionError as error:
            assert_names_the_file(error, path)
            return
        assert model.alpha == 0.35 and variables["params"]

    assert fuzz(examples, h5_cases, check) == examples
