"""Reference implementations that parity tests and benchmarks compare jaxdl against.

Each module imports its own framework (torch, ...) when it is imported, so
importing this package needs none of them; they come with the `test` extra.
"""

# Nothing is imported here: each reference is imported by its module path (its framework with it).
__all__: list[str] = []
