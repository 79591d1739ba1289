"""The CPU inference engine: a model's forward pass run the way XLA:CPU runs it fastest.

`apply_in_chunks(apply, variables, images)` computes `apply(variables,
images)` a few images per pass, several independent passes per step, over a
CPU device per core where there are several (each its share of the batch),
with an optional `top` run once on the whole result; `predict_in_chunks` is
it compiled with `compiler.INFERENCE_CPU_OPTIONS`. Nothing here knows which
model it runs: a model says how it is split (MobileNetV2's `body_and_top`) and
whether it runs here at all (`jaxdl.models.contract.inference_form`).
Written by hand: XLA has no switch that splits a batch into passes.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from jaxdl.runtime import compiler, sharding

# How XLA:CPU runs MobileNetV2's inference fastest (the figures: docs/numerics.md#mobilenetv2-inference-on-cpu).
# On one CPU device (JAX's default): forward passes of CPU_CHUNK images (a pair's expanded
# activations stay in cache), CPU_STREAMS of them independent in each step so that XLA runs
# them on both cores at once.
# With a CPU device per core (as `jaxdl classify` sets up, see `jaxdl.cli`), each device takes
# its share of the batch in passes of CPU_DEVICE_CHUNK images, CPU_DEVICE_STREAMS at a time, and
# runs the model's top (MobileNetV2's `part="top"`) once on its share: an AMD EPYC's two cores then
# stay busier than one device's scheduler keeps them. With XLA's own dots (`compiler.INFERENCE_CPU_OPTIONS`) two-image
# passes one at a time beat one-image passes two at a time.
# GPUs and TPUs take whole batches.
CPU_CHUNK = 2
CPU_STREAMS = 2
CPU_DEVICE_CHUNK = 2
CPU_DEVICE_STREAMS = 1


def inference_chunk() -> tuple[int, int] | None:
    """(images per forward pass, independent passes per step) on CPU; None (whole batches) elsewhere."""
    return (CPU_CHUNK, CPU_STREAMS) if jax.default_backend() == "cpu" else None


def inference_mesh() -> Mesh | None:
    """A mesh over this process's CPU devices where there are several and JAX runs on CPU; else None."""
    if jax.default_backend() != "cpu" or jax.device_count() < 2:
        return None
    return sharding.data_mesh(jax.devices())


def apply_in_chunks(apply, variables, images: jnp.ndarray, chunk: int | None = None,
                    streams: int | None = None, *, top=None, mesh: Mesh | None = None) -> jnp.ndarray:
    """`apply(variables, images)`, computed `chunk` images per pass and `streams` passes per step.

    With `top`, `top(variables, apply(variables, images))`, the top taking the
    whole batch at once: it must treat each image on its own, as inference does.
    With a `mesh` of several devices, each takes an equal share of the batch
    (padded) and runs it as above, `CPU_DEVICE_CHUNK`-image passes by default; the variables
    should be replicated over the mesh, and a batch smaller than the mesh is
    better run without one (the padding is computed too).
    The result is the same as one `apply` on the whole batch (which `chunk=len(images)` gives).
    """
    n = images.shape[0]
    mesh = None if mesh is None else sharding.resolve_mesh(mesh)  # it splits the batch over its `data` axis
    if mesh is not None and mesh.size > 1:
        parts = sharding.data_parallelism(mesh)
        images = jnp.pad(images, ((0, -n % parts),) + ((0, 0),) * (images.ndim - 1))
        share = functools.partial(apply_in_chunks, apply, chunk=chunk or CPU_DEVICE_CHUNK,
                                  streams=streams or CPU_DEVICE_STREAMS, top=top)
        spec = PartitionSpec(sharding.DATA_AXIS)
        return jax.shard_map(share, mesh=mesh, in_specs=(PartitionSpec(), spec), out_specs=spec)(variables, images)[:n]
    default_chunk, default_streams = inference_chunk() or (n, 1)
    chunk, streams = chunk or default_chunk, streams or default_streams
    if n <= chunk:
        outputs = apply(variables, images)
    else:
        group = chunk * streams
        padded = -(-n // group) * group
        images = jnp.pad(images, ((0, padded - n),) + ((0, 0),) * (images.ndim - 1))

        def step(part):  # `streams` passes with no data between them: XLA may run them concurrently
            return jnp.concatenate([apply(variables, part[i * chunk:(i + 1) * chunk]) for i in range(streams)])

        outputs = jax.lax.map(step, images.reshape(padded // group, group, *images.shape[1:]))
        outputs = outputs.reshape(padded, *outputs.shape[2:])[:n]
    return outputs if top is None else top(variables, outputs)


@functools.partial(compiler.jit, static_argnums=0, static_argnames=("top", "mesh"),
                   cpu_options=compiler.INFERENCE_CPU_OPTIONS)
def predict_in_chunks(apply, variables, images: jnp.ndarray, top=None, mesh: Mesh | None = None) -> jnp.ndarray:
    """`apply_in_chunks` compiled: inference on a whole array of images.

    `apply` and `top` key the compiled program: take them from a model's split (MobileNetV2's
    `jaxdl.models.mobilenet_v2.body_and_top`), which equal models
    share. A bound `model.apply` is a new key for every model object, equal or not (bound methods compare
    their object by identity), so each copy of a model would be traced and compiled again."""
    return apply_in_chunks(apply, variables, images, top=top, mesh=mesh)
