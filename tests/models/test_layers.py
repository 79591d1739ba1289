"""jaxdl.models.layers.max_pool: the reshape form XLA:CPU runs fast gives nn.max_pool's outputs and gradients."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdl.models import ConvNet
from jaxdl.models.layers import Conv, max_pool, pool_implementation
from jaxdl.training.steps import create_train_state, make_train_step
from tests.support import tolerance


@pytest.fixture(params=["cpu", "gpu"])
def backend(request, monkeypatch):
    """The backend that "auto" sees: a test taking this runs as on a CPU and as on a GPU, on whatever machine
    runs it. These tests had asserted the CPU's choices and failed on an H200, where "auto" rightly picks
    XLA's own convolution and pooling."""
    monkeypatch.setattr(jax, "default_backend", lambda: request.param)
    return request.param


@pytest.mark.parametrize("shape, window", [((2, 26, 26, 3), (2, 2)), ((2, 11, 7, 4), (2, 2)),
                                           ((3, 9, 10, 2), (3, 3)), ((2, 13, 5), (4,))])
@pytest.mark.parametrize("values", ["distinct", "tied"])
def test_reshape_form_gives_nn_max_pools_outputs_and_input_gradient(shape, window, values):
    """Outputs and input gradients bitwise, ties included (integer values: most windows hold several maxima;
    the gradient goes to the first, as select-and-scatter gives it), odd sizes dropping their last partial
    window as VALID does. Seen failing with the trailing rows kept instead of dropped (a reshape error for
    11x7), with the max over the wrong axes (outputs differ), and with JAX's own gradient of `max` (ties
    share it: the tied cases differ)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape) if values == "distinct" else rng.integers(0, 3, shape)
    x = jnp.asarray(x.astype(np.float32))
    reference = lambda x: nn.max_pool(x, window, strides=window)
    ours = lambda x: max_pool(x, window, strides=window, implementation="reshape")
    np.testing.assert_array_equal(ours(x), reference(x))
    upstream = jnp.asarray(rng.normal(size=reference(x).shape).astype(np.float32))
    gradient = lambda pool: jax.grad(lambda x: jnp.sum(pool(x) * upstream))(x)
    np.testing.assert_array_equal(gradient(ours), gradient(reference))


def test_a_batchnorm_convnet_trains_without_nan_at_the_suites_compiler_level():
    """Conv, BatchNorm, max pooling steps compiled at --xla_backend_optimization_level=0 (the suite's). Seen
    failing with JAX's own gradient of `max` (divided by the count of elements equal to the maximum): the
    pooled value and that comparison came from two fusions that rounded differently, a count was 0, and the
    second step's update made the parameters NaN (the loss of step 3 was NaN)."""
    model = ConvNet(layers=(("conv", 4, 3), ("batchnorm",), ("maxpool", 2), ("flatten",), ("dense", 3)))
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 64).astype(np.int32)
    x = (rng.normal(size=(64, 6, 6, 1)) + y[:, None, None, None]).astype(np.float32)
    state = create_train_state(model, optax.adam(1e-3), (6, 6, 1), jax.random.key(0))
    step = make_train_step("sparse_categorical_crossentropy")
    losses = []
    for start in range(0, 64, 16):
        state, metrics = step(state, {"x": x[start:start + 16], "y": y[start:start + 16]})
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all(), losses
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state.params))


def test_auto_picks_the_reshape_on_cpu_only_for_non_overlapping_windows_and_names_what_cannot_reshape(backend):
    assert pool_implementation("auto", (2, 2), (2, 2), "VALID") == ("reshape" if backend == "cpu" else "reduce_window")
    assert pool_implementation("auto", (3, 3), (2, 2), "VALID") == "reduce_window"
    assert pool_implementation("auto", (2, 2), (2, 2), "SAME") == "reduce_window"
    with pytest.raises(ValueError, match=r"strides equal to the window.*window \(3, 3\), strides \(2, 2\)"):
        max_pool(jnp.zeros((1, 8, 8, 1)), (3, 3), (2, 2), implementation="reshape")
    with pytest.raises(ValueError, match="implementation must be one of"):
        max_pool(jnp.zeros((1, 8, 8, 1)), (2, 2), implementation="fast")


def test_keras_convnet_step_has_no_select_and_scatter_and_trains_as_with_nn_max_pool(monkeypatch, backend):
    """keras.io's MNIST convnet on digit-like images with a blank background (tied maxima): one Adam step from
    the same parameters gives the same parameters with either pooling, and the compiled step on CPU holds no
    `select_and_scatter` (the slow gradient; elsewhere XLA's own pooling stays). Seen failing with ConvNet
    calling nn.max_pool again (the primitive is back in the step)."""
    model = ConvNet(layers=(("conv", 32, 3), ("maxpool", 2), ("conv", 64, 3), ("maxpool", 2), ("flatten",),
                            ("dense", 10)), padding="VALID", input_scale=1 / 255)
    rng = np.random.default_rng(0)
    x = np.zeros((16, 28, 28, 1), np.uint8)
    x[:, 8:20, 10:18] = rng.integers(0, 255, (16, 12, 8, 1))  # a blank border: equal patches, tied maxima
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(rng.integers(0, 10, 16).astype(np.int32))}
    state = create_train_state(model, optax.adam(1e-3), (28, 28, 1), jax.random.key(0))
    step = make_train_step("sparse_categorical_crossentropy", jit=False)
    assert ("select_and_scatter" in str(jax.make_jaxpr(step)(state, batch))) == (backend != "cpu")
    fast, _ = jax.jit(step)(state, batch)

    import jaxdl.models.small as small
    monkeypatch.setattr(small, "max_pool", lambda x, window, strides: nn.max_pool(x, window, strides=strides))
    step = make_train_step("sparse_categorical_crossentropy", jit=False)  # a new function: JAX caches traces
    assert "select_and_scatter" in str(jax.make_jaxpr(step)(state, batch))
    reference, _ = jax.jit(step)(state, batch)
    if jax.devices()[0].platform == "cpu":  # the same selections, the same XLA:CPU kernels: bitwise
        jax.tree.map(np.testing.assert_array_equal, fast.params, reference.params)
    else:  # two programs, each with its own autotuned convolution algorithms: 2.3e-7 relative seen on an H200
        tolerance.assert_close(fast.params, reference.params, tolerance.FEW_OPS)


@pytest.mark.parametrize("padding, kernel_size, channels", [("VALID", (3, 3), 1), ("SAME", (3, 3), 3),
                                                            ("SAME", (2, 4), 2)])
def test_conv_has_nn_convs_parameters_outputs_and_gradients_against_float64(padding, kernel_size, channels):
    """jaxdl.models.layers.Conv with its kernel gradient as products, nn.Conv, and a float64 numpy reference.

    Same parameter tree (variables move between the two), the same outputs (the same lax convolution, SAME
    padded beforehand), and kernel, bias and input gradients against float64 sums over every output position.
    Seen failing with the products' kernel offsets taken in (dx, dy) order (kernel gradient off by 50.1), and
    with SAME's extra row put before instead of after (the 2x4 kernel's outputs off by 4.81).
    """
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 9, 8, channels)).astype(np.float32)
    ours = Conv(5, kernel_size, padding=padding, implementation="shifted_products")
    reference = nn.Conv(5, kernel_size, padding=padding)
    variables = reference.init(jax.random.key(0), x)
    assert jax.tree.map(np.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(np.shape, variables)
    outputs = ours.apply(variables, x)
    upstream = rng.normal(size=outputs.shape).astype(np.float32)
    gradients = jax.grad(lambda v, x: jnp.sum(ours.apply(v, x) * upstream), argnums=(0, 1))(variables, x)
    expected = jax.grad(lambda v, x: jnp.sum(reference.apply(v, x) * upstream), argnums=(0, 1))(variables, x)
    terms = upstream.shape[0] * upstream.shape[1] * upstream.shape[2]  # what each kernel-gradient entry sums
    sums = tolerance.reordered_sums(terms, float(np.abs(x).max() * np.abs(upstream).max()))
    tolerance.assert_close(outputs, reference.apply(variables, x), tolerance.FEW_OPS)
    tolerance.assert_close(gradients, expected, sums)

    # float64: the kernel gradient sums, for each offset, input times upstream over every output position
    kh, kw = kernel_size
    padded = np.asarray(x, np.float64)
    if padding == "SAME":
        padded = np.pad(padded, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
    height, width = upstream.shape[1:3]
    kernel_gradient = np.stack([np.stack([np.einsum("nhwc,nhwf->cf", padded[:, dy:dy + height, dx:dx + width],
                                                    upstream.astype(np.float64)) for dx in range(kw)])
                                for dy in range(kh)])
    tolerance.assert_close(gradients[0]["params"]["kernel"], kernel_gradient, sums)
    tolerance.assert_close(gradients[0]["params"]["bias"], upstream.astype(np.float64).sum(axis=(0, 1, 2)), sums)


@pytest.mark.parametrize("options", ["jaxdl's", "XLA's defaults"])
def test_auto_takes_the_products_on_cpu_under_ynnpack_convolutions_for_image_inputs_only_and_names_bad_arguments(
        backend, options, monkeypatch):
    """The products only where they are the faster form (see jaxdl.models.layers' docstring): on CPU, for inputs of
    few channels, compiled without jaxdl's options (a user's own `jax.jit`, or an XLA_FLAGS choosing YNNPACK's
    convolutions). Seen failing with "auto" resolving to XLA's convolution for every input on CPU, and with
    the products kept under jaxdl's options."""
    from jaxdl.models.layers import conv_implementation
    from jaxdl.runtime import compiler

    if options == "XLA's defaults":
        monkeypatch.setattr(compiler, "compiler_options", lambda: None)
    takes_products = backend == "cpu" and compiler.compiler_options() is None
    assert conv_implementation("auto", 1) == conv_implementation("auto", 3) == (
        "shifted_products" if takes_products else "xla")
    assert conv_implementation("auto", 4) == "xla" and conv_implementation("xla", 1) == "xla"

    def products(channels):
        model = Conv(4, (3, 3))
        x = jnp.ones((2, 6, 6, channels))
        variables = model.init(jax.random.key(0), x)
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda v: jnp.sum(model.apply(v, x))))(variables))
        return jaxpr.count("dot_general[")

    assert products(1) == (9 if takes_products else 0) and products(8) == 0  # one per offset, or XLA's conv
    with pytest.raises(ValueError, match="Conv implementation must be one of"):
        Conv(4, (3, 3), implementation="fast").init(jax.random.key(0), jnp.ones((1, 5, 5, 1)))
    with pytest.raises(ValueError, match=r"Conv takes NHWC inputs \(4 axes\), got shape \(5, 5, 1\)"):
        Conv(4, (3, 3)).init(jax.random.key(0), jnp.ones((5, 5, 1)))
    with pytest.raises(ValueError, match="Conv padding must be 'SAME' or 'VALID', got 'CIRCULAR'"):
        Conv(4, (3, 3), padding="CIRCULAR").init(jax.random.key(0), jnp.ones((1, 5, 5, 1)))


@pytest.mark.parametrize("shape, window, strides, padding", [
    ((2, 8, 8, 3), (2, 2), None, "VALID"),  # strides None: Flax's 1s, overlapping windows
    ((2, 9, 7, 3), (3, 3), (3, 3), "VALID"),  # the reshape form's case, partial windows dropped
    ((2, 8, 8, 3), (2, 2), (2, 2), "SAME"),
    ((2, 9, 9, 2), (3, 3), (2, 2), "SAME"),
    ((2, 8, 8, 1), (2, 2), (2, 2), ((0, 0), (0, 0))),  # explicit pairs: no padding
    ((2, 8, 8, 1), (2, 2), (2, 2), ((1, 0), (0, 1))),
    ((8, 8, 3), (2, 2), (2, 2), "VALID"),  # no batch axis
    ((8, 8, 3), (2, 2), None, "SAME"),
    ((2, 3, 8, 6, 1), (2, 2), (2, 2), "VALID"),  # two batch axes
    ((2, 13, 5), (4,), None, "VALID"),
])
def test_max_pool_takes_nn_max_pools_arguments_and_gives_its_outputs_and_gradients(backend, shape, window, strides,
                                                                                 padding):
    """`max_pool(x, window_shape, strides, padding)` is `nn.max_pool(x, window_shape, strides, padding)`, bitwise,
    gradients included, on the backend "auto" sees as CPU (the reshape form where windows do not overlap) and as
    GPU. Seen failing before `strides=None` meant 1 as in Flax (it meant the window: shape (2, 4, 4, 3) against
    Flax's (2, 7, 7, 3)) and before inputs without a batch axis, or with two, were taken ("the input of shape
    (8, 8, 3) has 1 between batch and features", on CPU only)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape).astype(np.float32))
    flax_pool = lambda x: nn.max_pool(x, window, strides=strides, padding=padding)
    upstream = jnp.asarray(rng.normal(size=jax.eval_shape(flax_pool, x).shape).astype(np.float32))

    def outputs_and_gradient(pool):  # one compiled program per form: quicker than op-by-op dispatch
        outputs, pullback = jax.vjp(pool, x)
        return outputs, pullback(upstream)[0]

    outputs, gradient = jax.jit(outputs_and_gradient, static_argnums=0)(
        lambda x: max_pool(x, window, strides, padding))
    expected, expected_gradient = jax.jit(outputs_and_gradient, static_argnums=0)(flax_pool)
    assert outputs.shape == expected.shape
    np.testing.assert_array_equal(outputs, expected)
    np.testing.assert_array_equal(gradient, expected_gradient)


def test_max_pool_names_a_window_the_input_cannot_hold():
    with pytest.raises(ValueError, match=r"window \(2, 2\) has 2 axes, but the input of shape \(8, 3\) has 2 in all"):
        max_pool(jnp.zeros((8, 3)), (2, 2))
    with pytest.raises(ValueError, match=r"strides \(2,\) has 1 axes, the window \(2, 2\) has 2"):
        max_pool(jnp.zeros((1, 8, 8, 3)), (2, 2), (2,))


def _forms(monkeypatch, which: str):
    """Makes "auto" resolve to jaxdl's CPU forms ("ours": the reshape pooling, the conv products) or to Flax's
    lowerings ("reference": reduce_window, XLA's convolution), whatever the machine."""
    from jaxdl.runtime import compiler

    monkeypatch.setattr(jax, "default_backend", lambda: "cpu" if which == "ours" else "gpu")
    monkeypatch.setattr(compiler, "compiler_options", lambda *args: None)


TANH_CONVNET = ConvNet(layers=(("conv", 3, 3, "tanh"), ("maxpool", 2), ("flatten",), ("dense", 4, "tanh"),
                               ("dense", 2)))


def test_forward_mode_and_second_derivatives_through_a_convnet_match_flaxs_forms_and_finite_differences(
        monkeypatch):
    """jax.jvp, jax.linearize, jax.jacfwd and jax.hessian through a ConvNet in jaxdl's CPU forms (the reshape
    pooling and the conv products): the same values as through nn.max_pool and XLA's convolution, and jvp
    against a float64 central difference. Seen failing with the CPU forms as `custom_vjp`s ("can't apply
    forward-mode autodiff (jvp) to a custom_vjp function")."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 1)).astype(np.float32))
    direction = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
    variables = TANH_CONVNET.init(jax.random.key(0), x)
    results = {}
    for which in ("ours", "reference"):
        _forms(monkeypatch, which)
        forward = lambda x: TANH_CONVNET.apply(variables, x)  # a new function: JAX caches traces
        jaxpr = str(jax.make_jaxpr(forward)(x))
        assert ("reduce_window_max" in jaxpr) == (which == "reference")  # each form is the one meant

        def derivatives(x, direction):  # one program per form: quicker than op-by-op dispatch
            outputs, tangent = jax.jvp(forward, (x,), (direction,))
            one = x[:1]
            scalar = lambda x: jnp.sum(forward(x) ** 2)
            return {"outputs": outputs, "tangent": tangent, "linearized": jax.linearize(forward, x)[1](direction),
                    "jacfwd": jax.jacfwd(forward)(one), "jacrev": jax.jacrev(forward)(one),
                    "hessian": jax.hessian(scalar)(one)}

        results[which] = jax.jit(derivatives)(x, direction)
    ours, reference = results["ours"], results["reference"]
    # the same network in two lowerings: a few ops' roundings apart (FEW_OPS), and within one form the
    # forward- and reverse-mode Jacobians sum the same products in another order
    tolerance.assert_close(ours, reference, tolerance.FEW_OPS)
    tolerance.assert_close(ours["linearized"], ours["tangent"], tolerance.FEW_OPS)
    tolerance.assert_close(ours["jacfwd"], ours["jacrev"], tolerance.FEW_OPS)
    assert np.abs(np.asarray(ours["hessian"])).max() > 1e-2  # tanh layers: a hessian that is not zero

    with jax.enable_x64(True):  # a float64 central difference of the same network along `direction`
        model64 = TANH_CONVNET.clone(dtype=jnp.float64)
        variables64 = jax.tree.map(lambda v: np.asarray(v, np.float64), variables)
        at = lambda t: np.asarray(model64.apply(variables64, np.asarray(x, np.float64)
                                                + t * np.asarray(direction, np.float64)))
        step = 1e-6
        numeric = (at(step) - at(-step)) / (2 * step)
    # a tangent through 9-term convolutions, a 27-term dense layer and a 4-term one: the entry's ~30 terms
    tolerance.assert_close(ours["tangent"], numeric, tolerance.GRADIENT_AGAINST_FLOAT64)


def test_conv_products_support_forward_mode_and_second_derivatives(monkeypatch):
    """Conv(implementation="shifted_products") under jax.jvp (in the input and the kernel together),
    jax.jacfwd and jax.hessian gives what XLA's convolution gives, and the jvp a float64 central difference
    along both tangents. Seen failing with the products as a `custom_vjp` (jvp refused)."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 6, 5, 2)).astype(np.float32))
    ours, reference = Conv(3, (3, 3), implementation="shifted_products"), Conv(3, (3, 3), implementation="xla")
    variables = reference.init(jax.random.key(0), x)
    kernel = variables["params"]["kernel"]
    tangents = (jnp.asarray(rng.normal(size=x.shape).astype(np.float32)),
                jnp.asarray(rng.normal(size=kernel.shape).astype(np.float32)))

    def derivatives(model):
        def f(x, kernel):
            return jnp.tanh(model.apply({"params": {**variables["params"], "kernel": kernel}}, x))

        scalar = lambda kernel: jnp.sum(f(x, kernel))
        return {"jvp": jax.jvp(f, (x, kernel), tangents),
                "jvp_input_only": jax.jvp(lambda x: f(x, kernel), (x,), tangents[:1]),
                "jacfwd": jax.jacfwd(scalar)(kernel), "grad": jax.grad(scalar)(kernel),
                "hessian": jax.hessian(scalar)(kernel)}

    # one program each: quicker than op-by-op dispatch; both forms a few ops' roundings apart (FEW_OPS)
    products, expected = jax.jit(lambda: derivatives(ours))(), jax.jit(lambda: derivatives(reference))()
    tolerance.assert_close(products, expected, tolerance.FEW_OPS)
    tolerance.assert_close(products["jacfwd"], products["grad"], tolerance.FEW_OPS)

    with jax.enable_x64(True):
        def at(t):
            x64 = np.asarray(x, np.float64) + t * np.asarray(tangents[0], np.float64)
            kernel64 = np.asarray(kernel, np.float64) + t * np.asarray(tangents[1], np.float64)
            params = {**jax.tree.map(lambda v: np.asarray(v, np.float64), variables["params"]), "kernel": kernel64}
            return np.tanh(np.asarray(reference.clone(dtype=jnp.float64).apply({"params": params}, x64)))

        step = 1e-6
        numeric = (at(step) - at(-step)) / (2 * step)
    # each tangent sums 18 input and 18 kernel products of order 1: within the entry's ~30 terms
    tolerance.assert_close(products["jvp"][1], numeric, tolerance.GRADIENT_AGAINST_FLOAT64)
