"""Dependencies point one way: the application layer (xrayops/app) composes adapters and core;
components/pipelines/serving import the core; the core imports neither."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = {"kfp", "kserve", "serving", "components", "pipelines"}
APPLICATION = ROOT / "xrayops" / "app"
# The CLI still sits beside the core; it imports adapters only inside its verbs.
COMPOSITION_ROOTS = {"cli.py"}


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
        is_root = path.parent.name == "xrayops" and path.name in COMPOSITION_ROOTS
        bad = _imports(tree, top_level_only=is_root) & ADAPTERS
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}


def test_adapters_import_the_core():
    for folder in ("components", "pipelines", "serving"):
        imported = set()
        for path in (ROOT / folder).rglob("*.py"):
            imported |= _imports(ast.parse(path.read_text()), top_level_only=False)
        assert "xrayops" in imported or folder == "pipelines", folder
