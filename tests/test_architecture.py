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


PRODUCT = ("xrayops", "components", "pipelines", "serving")
LONG_FUNCTION, TOO_LONG_FUNCTION = 80, 120


def _function_lengths(source: str) -> list[tuple[str, int, int, bool]]:
    """(name, first line, length, has_reason) of every function and method, nested ones included.

    Length counts from the `def` line to the body's last line. has_reason: the line right
    above the def, or above its first decorator, is a `#` comment."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            top = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            above = lines[top - 2].strip() if top >= 2 else ""
            found.append((node.name, node.lineno, node.end_lineno - node.lineno + 1, above.startswith("#")))
    return found


def test_the_length_rule_sees_long_functions_and_their_reasons():
    body = "".join(f"    x{i} = {i}\n" for i in range(85))
    source = f"def bare():\n{body}\n\n# One function: a reason.\n@staticmethod\ndef reasoned():\n{body}"
    assert [(name, n, reason) for name, _, n, reason in _function_lengths(source)] == [
        ("bare", 86, False), ("reasoned", 86, True)
    ]


def test_no_product_function_is_long_without_a_reason_or_too_long():
    """No function over 120 lines; none over 80 without a one-line reason as the comment right
    above its `def` (or its first decorator), e.g. "# One function: the pipeline graph reads top
    to bottom as the DAG it compiles to."."""
    too_long, unexplained = [], []
    for folder in PRODUCT:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for name, line, length, reason in _function_lengths(path.read_text()):
                where = f"{path.relative_to(ROOT)}:{line} {name} ({length} lines)"
                if length > TOO_LONG_FUNCTION:
                    too_long.append(where)
                elif length > LONG_FUNCTION and not reason:
                    unexplained.append(where)
    assert too_long == [] and unexplained == []
