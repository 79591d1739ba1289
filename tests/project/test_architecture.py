"""The package's layout as docs/architecture.md draws it: layers importing one way, declared faces, no reaching in.

Read from the source with `ast` (nothing is imported), so a new upward import,
a private name taken from another module, a subpackage without `__all__` or a
model class named in the training code fails here, naming the file and line.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
while not (ROOT / "jaxdl").is_dir():  # tests may live a folder deeper than tests/
    ROOT = ROOT.parent
PACKAGE = ROOT / "jaxdl"

# Each layer may import itself and the layers below it, nothing above (docs/architecture.md):
# data <- runtime <- models <- training <- pretrained <- cli; plots and the torch reference stand alone.
LAYERS = {
    "cli": ("cli", "pretrained", "training", "models", "runtime", "data", "plots"),
    "pretrained": ("pretrained", "training", "models", "runtime", "data"),
    "training": ("training", "models", "runtime", "data"),
    "models": ("models", "runtime", "data"),
    "runtime": ("runtime", "data"),
    "data": ("data",),
    "plots": ("plots",),
    "references": ("references",),
}


def _layer(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0] if parts[0] != "__init__" else "__init__"


def _imports(path: Path):
    """(line, imported module, names) of every import of a jaxdl module in `path`, at any depth."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "jaxdl":
            yield node.lineno, node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "jaxdl":
                    yield node.lineno, alias.name, []


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_each_layer_imports_only_the_layers_below_it():
    upward = []
    for path in _modules():
        layer = _layer(path)
        if layer == "__init__":
            continue  # the package's face re-exports every layer's
        for line, module, names in _imports(path):
            parts = module.split(".")
            targets = [parts[1]] if len(parts) > 1 else names  # `from jaxdl import data` names the layer
            for target in targets:
                target = target.split(".")[0]
                if target not in LAYERS[layer] and target != "__version__":
                    upward.append(f"{path.relative_to(ROOT)}:{line} ({layer}) imports jaxdl.{target}")
    assert upward == []


def test_no_module_imports_another_modules_private_names():
    private = [f"{path.relative_to(ROOT)}:{line} imports {name} from {module}"
               for path in _modules() for line, module, names in _imports(path)
               for name in names if name.startswith("_") and not name.startswith("__")]
    assert private == []


def test_the_training_code_names_no_model_class():
    """Model-specific behaviour reaches `fit`, `predict` and the steps through the model's own hook
    (`jaxdl.models.contract.inference_form`), never by asking which model it holds."""
    named = [f"{path.relative_to(ROOT)}:{number}"
             for path in sorted((PACKAGE / "training").glob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if any(word in line for word in ("MobileNetV2", "FineTuneModel", "mobilenet_v2"))]
    assert named == []


@pytest.mark.parametrize("package", ["jaxdl", "jaxdl.data", "jaxdl.models", "jaxdl.training", "jaxdl.runtime",
                                     "jaxdl.pretrained"])
def test_every_face_declares_all_and_offers_what_it_declares(package):
    import importlib

    face = importlib.import_module(package)
    assert isinstance(face.__all__, list) and face.__all__
    assert [name for name in face.__all__ if not hasattr(face, name)] == []
    assert len(set(face.__all__)) == len(face.__all__)


def test_the_data_face_offers_no_internal_machinery():
    import jaxdl.data

    internals = {"padded_indices", "process_part", "epoch_seed", "rows_to_split", "split_evenly", "check_dataset",
                 "positive_int", "stacked", "to_device", "fits_on_device"}
    assert internals & set(jaxdl.data.__all__) == set()


def test_the_top_level_holds_at_most_ten_modules():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 10, top
