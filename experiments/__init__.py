"""Experiment scripts that reproduce introductory deep-learning tutorials in JAX.

Each is `python -m experiments.NAME`; `python -m experiments.suite` runs them all.
"""
