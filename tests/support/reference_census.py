"""Counts the suite's numeric tests and those whose expected values come from outside jaxdl.

`python -m tests.support.reference_census` prints the counts README's testing section quotes. A test function is
*numeric* when its body (with the module's helpers it calls by name) compares numbers: `assert_close`,
`np.testing.assert_*`, `pytest.approx`, or `==` against a float literal. It has an *independent reference*
when that code also names one of REFERENCES: another framework (Keras, torch, ONNX), float64 arithmetic
(a numpy reimplementation or a finite difference), PIL, a golden file made by torch, or a published
constant (the tutorials' parameter counts and answers, marked "published" or given as literals the
tutorial prints). The rest compare jaxdl with itself (another path, a resumed run, another device count),
which checks sameness, not correctness. Static and by keyword, so it is an estimate; its rules are these
lines, and a test counted wrongly can be found by reading the per-file table it prints.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
NUMERIC = re.compile(r"assert_close|np\.testing\.assert_|assert_allclose|assert_array_equal|pytest\.approx|"
                     r"==\s*-?\d+\.\d|==\s*\d[\d_]{2,}|==\s*\(?\d+\s*/\s*\d+")
REFERENCES = re.compile(r"keras|torch|onnx|float64|np\.float64|finite.difference|central difference|"
                        r"PIL|Image\.|torch_reference|published|tutorial|closed.form|by hand|numpy reference|"
                        r"softmax64|np\.log|np\.exp|np\.mean|np\.sqrt|np\.sum", re.IGNORECASE)


def functions(tree) -> dict[str, ast.FunctionDef]:
    return {node.name: node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}


def source_with_helpers(node, source: str, helpers: dict, depth: int = 2) -> str:
    text = ast.get_source_segment(source, node) or ""
    if depth:
        called = {n.func.id for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        fixtures = {a.arg for a in node.args.args}
        for name in (called | fixtures) & set(helpers):
            if helpers[name] is not node:
                text += source_with_helpers(helpers[name], source, helpers, depth - 1)
    return text


def census() -> tuple[int, int, dict]:
    per_file, numeric_total, independent_total = {}, 0, 0
    conftest = (TESTS / "conftest.py").read_text()
    shared = functions(ast.parse(conftest))
    for path in sorted(TESTS.rglob("test_*.py")):
        source = path.read_text()
        tree = ast.parse(source)
        helpers = {**functions(tree)}
        numeric = independent = 0
        for name, node in helpers.items():
            if not name.startswith("test_"):
                continue
            text = source_with_helpers(node, source, helpers)
            for fixture in {a.arg for a in node.args.args} & set(shared):
                text += ast.get_source_segment(conftest, shared[fixture]) or ""
            if NUMERIC.search(text):
                numeric += 1
                independent += bool(REFERENCES.search(text))
        if numeric:
            per_file[path.relative_to(TESTS).as_posix()] = (numeric, independent)
        numeric_total, independent_total = numeric_total + numeric, independent_total + independent
    return numeric_total, independent_total, per_file


def main() -> None:
    numeric, independent, per_file = census()
    for name, (n, i) in per_file.items():
        print(f"{name:44s} {i:3d} of {n:3d} numeric tests against an independent reference")
    print(f"total: {independent} of {numeric} numeric test functions ({independent / numeric:.0%}) compare with an "
          "independent reference")


if __name__ == "__main__":
    sys.exit(main())
