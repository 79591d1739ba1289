"""What the tests share: the tolerance policy, toy data, the Keras reference models, golden files, and the
scripts tests run in processes of their own (`python -m tests.support.NAME` from the repository root)."""
