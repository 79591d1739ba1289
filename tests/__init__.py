"""The test suite: a folder per subpackage of jaxdl, `project/` for checks of the whole, `support/` for helpers.

Packages, so that pytest (its default `prepend` import mode) puts the repository root on sys.path and imports
each test file by its dotted name (`tests.training.test_steps`): files of one name in two folders cannot
collide, and helpers import as `from tests.support import tolerance`.
"""
