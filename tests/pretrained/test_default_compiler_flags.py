"""The parity and golden tests again, compiled as users' programs are: with XLA:CPU's default LLVM optimizations.

The suite compiles with `--xla_backend_optimization_level=0` for speed (tests/conftest.py); users never do.
Optimized code may fuse, vectorise and contract differently, so the comparisons that make jaxdl's numeric
claims (torch's logits of the photos through the folded network, and the golden photos; the Keras tests are
left out: their models and captures compile for 8 to 27 s at this level, and the torchvision test on random
images, 9 s, adds no kind of comparison the photos do not make) run once more here, in a subprocess with level 3,
XLA's own default (`DefaultDebugOptionsIgnoringFlags` in xla/debug_options_flags.cc).
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
SUBSET = [
    "tests/pretrained/test_classifier.py::test_logits_of_the_photos_match_torch_on_torchvisions_own_pipeline",
    "tests/pretrained/test_classifier.py::test_golden_logits_and_top5",
]


def test_parity_and_golden_tests_pass_under_the_default_compiler_flags():
    """Seen failing with block 3's stride moved to block 4 in jaxdl's BLOCKS: the subprocess's torch and
    golden comparisons fail, and its failure fails this test."""
    flags = " ".join(flag for flag in os.environ.get("XLA_FLAGS", "").split()
                     if "xla_backend_optimization_level" not in flag)
    env = {**os.environ, "XLA_FLAGS": f"{flags} --xla_backend_optimization_level=3".strip()}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                             *SUBSET], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "4 passed" in result.stdout  # each test runs for both photos
