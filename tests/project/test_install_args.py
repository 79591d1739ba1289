"""`make`'s install hands pip's package locations to uv (.ci/pip_config_as_uv_args.py)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location("pip_config_as_uv_args", ROOT / ".ci" / "pip_config_as_uv_args.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pips_indexes_links_and_constraints_become_uv_arguments_once_each(tmp_path):
    """As `pip config list` prints them: global and environment entries, quoted, several URLs in one value."""
    wheels, constraints = tmp_path / "wheels", tmp_path / "constraints.txt"
    wheels.mkdir()
    constraints.write_text("torch<=2.14.1\n")
    listed = "\n".join([
        "global.cert='/etc/ssl/certs/ca-certificates.crt'",
        f"global.constraint='{constraints}'",
        f"global.extra-index-url='file://{tmp_path} file://{tmp_path}/missing https://example.org/simple'",
        f"global.find-links='{wheels}'",
        "global.index-url='https://pypi.example/simple'",
        ":env:.default-timeout='180'",
        f":env:.find-links='{wheels}'",  # the same as the global one: passed once
    ])
    assert load_script().uv_args(listed) == [
        "--index-strategy", "unsafe-best-match",  # pip's choice: the newest release from any index
        "--constraint", str(constraints),
        "--extra-index-url", f"file://{tmp_path}",  # file://.../missing left out: uv would fail on it
        "--extra-index-url", "https://example.org/simple",
        "--find-links", str(wheels),
        "--index-url", "https://pypi.example/simple",
    ]


def test_no_pip_configuration_gives_uv_its_defaults_and_pips_index_choice():
    assert load_script().uv_args("") == ["--index-strategy", "unsafe-best-match"]
