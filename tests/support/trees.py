"""Comparing trees of arrays that hold random keys (an NNX module's `nnx.Rngs`, a state's dropout key)."""
import jax


def raw(leaf):
    """`leaf` as an array to compare: a typed random key by its raw data, anything else as it is."""
    return jax.random.key_data(leaf) if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) else leaf
