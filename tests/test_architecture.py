"""Dependencies point one way: the application layer (xrayops/app) composes adapters and core;
components/pipelines/serving import the core; the core imports neither."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = {"kfp", "kserve", "serving", "components", "pipelines"}
APPLICATION = ROOT / "xrayops" / "app"


def _imports(tree: ast.AST, top_level_only: bool) -> set[str]:
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_core_never_imports_adapters():
    offenders = {}
    for path in (ROOT / "xrayops").rglob("*.py"):
        if path.is_relative_to(APPLICATION):
            continue
        tree = ast.parse(path.read_text())
        bad = _imports(tree, top_level_only=False) & ADAPTERS
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}


def test_adapters_import_the_core():
    for folder in ("components", "pipelines", "serving"):
        imported = set()
        for path in (ROOT / folder).rglob("*.py"):
            imported |= _imports(ast.parse(path.read_text()), top_level_only=False)
        assert "xrayops" in imported or folder == "pipelines", folder


def test_every_error_the_product_raises_on_purpose_shares_one_base():
    """The CLI maps XrayopsError to one line and an exit code; every deliberate error class must be one."""
    classes = {}
    for folder in ("xrayops", "serving", "components", "pipelines"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and node.name.endswith("Error") and node.name != "XrayopsError":
                    classes[node.name] = (path, {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases})
    allowed = {"XrayopsError", *classes}
    offenders = [f"{p.relative_to(ROOT)}:{name}" for name, (p, bases) in classes.items() if not bases & allowed]
    assert len(classes) > 10 and offenders == []


def test_the_cli_turns_an_xrayops_error_into_one_line_and_its_exit_code(monkeypatch, capsys):
    import pytest

    from xrayops.app import cli
    from xrayops.errors import XrayopsError

    class Refused(XrayopsError):
        exit_code = 3

    def boom():
        raise Refused("the archive is not mounted")

    monkeypatch.setattr(cli, "app", boom)
    with pytest.raises(SystemExit) as caught:
        cli.main()
    assert caught.value.code == 3
    assert "the archive is not mounted" in capsys.readouterr().err
