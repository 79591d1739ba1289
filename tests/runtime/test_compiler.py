"""jaxdl.runtime.compiler: on XLA:CPU jaxdl's programs keep their convolutions out of YNNPACK; everything else as XLA's
defaults, and a user's own choice of the option wins."""
import ast
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest

from experiments.mnist import CNN_MODEL, MLP_MODEL
from jaxdl.runtime import compiler
from jaxdl.training.steps import create_train_state, make_train_step

ROOT = Path(__file__).parents[2]


def library_fusions(compiled: str) -> list[set[str]]:
    """The operations inside each YNNPACK fusion of an optimized HLO module's text."""
    computations = {}
    for block in compiled.split("\n\n"):
        header = re.match(r"\s*(?:ENTRY )?%?([\w.-]+)", block)
        if header:
            computations[header.group(1)] = block
    return [set(re.findall(r"= \S+ (\w+)\(", computations[re.search(r"calls=%([\w.-]+)", line).group(1)]))
            for line in compiled.splitlines() if '"kind":"__ynn_fusion"' in line]


def step_texts(model, input_shape, dtype):
    """The optimized HLO of one train step as a plain `jax.jit` compiles it and as `compiler.jit` does."""
    state = create_train_state(model, optax.adam(1e-3), input_shape, jax.random.key(0))
    batch = {"x": jnp.zeros((128, *input_shape), dtype), "y": jnp.zeros(128, jnp.int32)}
    step = make_train_step("sparse_categorical_crossentropy", jit=False)
    return [jit(step).lower(state, batch).compile().as_text() for jit in (jax.jit, compiler.jit)]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the options are XLA:CPU's; elsewhere none are passed")
def test_the_convnets_step_keeps_its_convolutions_out_of_ynnpack_and_a_dense_step_compiles_as_by_default():
    """keras.io's MNIST convnet: by default 4 of its convolutions (forward and gradients) are YNNPACK fusions,
    under jaxdl's options none is, and its dots and reductions still are. The MLP's step, which has no
    convolution, compiles to the same program either way (metadata aside). Seen failing with the programs
    compiled by a plain `jax.jit` (the 4 convolution fusions are back)."""
    default, ours = step_texts(CNN_MODEL, (28, 28, 1), jnp.uint8)
    assert sum("convolution" in ops for ops in library_fusions(default)) == 4
    assert not any("convolution" in ops for ops in library_fusions(ours))
    assert any("dot" in ops for ops in library_fusions(ours)) and any("reduce" in ops for ops in library_fusions(ours))

    default, ours = step_texts(MLP_MODEL, (28, 28), jnp.uint8)
    without_metadata = [re.sub(r", metadata=\{[^}]*\}", "", text) for text in (default, ours)]
    assert without_metadata[0] == without_metadata[1]


def test_xla_flags_naming_the_option_win_and_an_option_this_xla_refuses_is_dropped(monkeypatch):
    """An option XLA_FLAGS names is left out, the others kept. Seen failing with the XLA_FLAGS check left out
    (the user's choice overridden) and with the probe always answering yes (every jaxdl program then fails
    to compile on a jax that renamed the option)."""
    if jax.default_backend() == "cpu":
        assert compiler.compiler_options() == compiler.CPU_OPTIONS
        monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_prefer_vector_width=256")
        assert compiler.compiler_options(compiler.INFERENCE_CPU_OPTIONS) == {
            compiler.YNN_FUSION_TYPE: compiler.INFERENCE_CPU_OPTIONS[compiler.YNN_FUSION_TYPE]}
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")
    assert compiler.compiler_options() is None
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setattr(compiler, "CPU_OPTIONS", {"xla_cpu_no_such_option_in_any_xla": "1"})
    assert compiler.compiler_options() is None
    monkeypatch.setattr(compiler, "CPU_OPTIONS", {compiler.YNN_FUSION_TYPE: "LIBRARY_FUSION_TYPE_NO_SUCH_TYPE"})
    assert compiler.compiler_options() is None
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert compiler.compiler_options() is None


def test_jit_reads_the_options_at_its_first_call_and_is_used_as_jax_jit_is(monkeypatch):
    """A module-level program is defined before a backend exists: the options are read when it first runs.
    Inside a user's own `jax.jit` it runs as a nested jit (JAX refuses options there: seen failing so)."""
    nested = compiler.jit(lambda x: x * 3)
    assert float(jax.jit(lambda x: nested(x) + 1)(jnp.float32(2))) == 7.0
    assert float(nested(jnp.float32(2))) == 6.0
    read = []
    monkeypatch.setattr(compiler, "compiler_options", lambda cpu_options=None: read.append(1))  # XLA's defaults

    program = compiler.jit(lambda x, times: x * 2 * times, static_argnames=("times",))
    assert read == []
    assert float(program(jnp.float32(1.5), times=2)) == 6.0 and read == [1]
    assert float(program(jnp.float32(2.0), times=2)) == 8.0 and read == [1]  # one jax.jit, built once
    assert program._cache_size() == 1 and "HloModule" in program.lower(jnp.float32(1), times=3).compile().as_text()


def test_jaxdl_compiles_through_compiler_jit_only():
    """Every compiled program in jaxdl/ goes through `jaxdl.runtime.compiler.jit` (a plain `jax.jit` would compile the
    convnets' steps with YNNPACK's slow convolutions). Seen failing with one `jax.jit` put back in training/steps.py."""
    plain = []
    for path in (ROOT / "jaxdl").rglob("*.py"):
        if path.name == "compiler.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            attribute = isinstance(node, ast.Attribute) and getattr(node.value, "id", "") == "jax"
            if attribute and node.attr in ("jit", "pmap"):
                plain.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert plain == []


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the options are XLA:CPU's; elsewhere none are passed")
def test_inference_programs_compile_their_dots_as_xlas_own(tmp_path):
    """`predict_in_chunks` (MobileNetV2's forward pass in classify and finetune) and a program `jaxdl classify`
    caches keep YNNPACK out of their dots (`INFERENCE_CPU_OPTIONS`: 1.016-1.024x the images per second at batch
    32); the default options keep YNNPACK's. The cache key names the options. A small dense model stands in
    for MobileNetV2 (the options are the program's, whatever the model). Seen failing with `predict_in_chunks`
    on the default options (its dot in a YNNPACK fusion)."""
    from flax import linen as nn

    from jaxdl.models.mobilenet_v2 import body_and_top
    from jaxdl.runtime import program_cache as aot
    from jaxdl.runtime.inference import predict_in_chunks

    model = nn.Dense(64)
    x = jnp.ones((8, 32))
    variables = model.init(jax.random.key(0), x)
    apply, top = body_and_top(model)
    inference = predict_in_chunks.lower(apply, variables, x, top=top).compile().as_text()
    default = compiler.jit(apply).lower(variables, x).compile().as_text()
    assert any("dot" in ops for ops in library_fusions(default))
    assert not any("dot" in ops for ops in library_fusions(inference)) and " dot(" in inference

    cached = aot.cached_program(lambda x: apply(variables, x), (x,), tmp_path, "k",
                                cpu_options=compiler.INFERENCE_CPU_OPTIONS).as_text()
    assert not any("dot" in ops for ops in library_fusions(cached)) and " dot(" in cached
    assert aot.program_key("m", cpu_options=compiler.INFERENCE_CPU_OPTIONS) != aot.program_key("m")
