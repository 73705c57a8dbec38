"""The documentation a newcomer meets: a short front door, no project history, papers cited by
author and year, and a module list that matches the code."""
from __future__ import annotations

import importlib
import importlib.util
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_LIMIT = 12_000
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]

# What a reader cannot use: the history of how a result was reached, and pointers that only make
# sense inside the team (placeholder paper numbers, files outside the repository).
FORBIDDEN = {
    "a session number or history": re.compile(r"\bsessions?\b", re.IGNORECASE),
    "an issue number": re.compile(r"\bissues?\s*#?\s*\d+|\bissue\s*#", re.IGNORECASE),
    "a placeholder citation (cite by author and year, docs/references.md)": re.compile(
        r"\bpapers?\s+0\d\d", re.IGNORECASE
    ),
    "a path outside the repository": re.compile(r"\.\./shared|\bDESIGN\.md\b|\bSEED_FACTS(\.md)?\b"),
}


MODULE_LINE = re.compile(r"^- \*\*`([\w.]+)`\*\*")


def _generator():
    spec = importlib.util.spec_from_file_location("gen_architecture", ROOT / "docs" / "gen_architecture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def forbidden_lines(text: str) -> list[tuple[int, str, str]]:
    """(line number, what it is, the line) for every line holding a forbidden phrase."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        for what, pattern in FORBIDDEN.items():
            if pattern.search(line):
                found.append((number, what, line.strip()[:160]))
    return found


def test_readme_is_a_short_front_door():
    # Bytes, not characters: arrows and dashes count as their UTF-8 length, as a reviewer's tools measure it.
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md has {size} bytes (limit {README_LIMIT}): move results to docs/results.md"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_carry_no_history_and_cite_papers_by_author(page):
    text = page.read_text(encoding="utf-8")
    gen = _generator()
    generated = range(0, 0)
    if gen.BEGIN in text:
        first = text[: text.index(gen.BEGIN)].count("\n") + 1
        last = text[: text.index(gen.END)].count("\n") + 1
        generated = range(first, last + 1)
    lines = text.splitlines()

    def source(n: int) -> str:
        """For a line of the generated module list: the module whose docstrings it came from."""
        if n not in generated:
            return ""
        for previous in reversed(lines[:n]):
            if match := MODULE_LINE.match(previous):
                return f" (from a docstring in {match[1]}: fix it there, then run `python docs/gen_architecture.py`)"
        return ""

    problems = [
        f"{page.relative_to(ROOT)}:{n}: {what}{source(n)}\n    {line}" for n, what, line in forbidden_lines(text)
    ]
    assert not problems, "\n".join(problems)


def cli_verbs() -> list[str]:
    """Every verb of the `xrayops` console script, groups as "group verb"."""
    import typer.main

    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["xrayops"]
    module, attribute = target.split(":")
    entry = importlib.import_module(module)
    target_app = getattr(entry, attribute)
    if not isinstance(target_app, typer.Typer):  # a main() around the app: the app beside it
        target_app = entry.app
    group = typer.main.get_command(target_app)
    verbs = []
    for name, command in group.commands.items():
        subcommands = getattr(command, "commands", None)
        verbs += [f"{name} {sub}" for sub in subcommands] if subcommands else [name]
    return sorted(verbs)


def test_readme_cli_map_names_every_verb():
    text = README.read_text(encoding="utf-8")
    cli_map = text[text.index("## The CLI"):].split("\n## ", 1)[0]
    missing = [verb for verb in cli_verbs() if f"`{verb}`" not in cli_map]
    assert "pipeline submit" in cli_verbs()
    assert not missing, f"README.md's CLI map lacks {missing}: add them (`xrayops --help`, `xrayops GROUP --help`)"


def test_forbidden_phrases_are_recognised():
    text = "\n".join([
        "Re-run in session 6.",
        "see issue #12",
        "as paper 000 does",
        "papers 001/003",
        "read ../shared/notes",
        "Langer et al. 2024 (Fig. 2); a gRPC stream; the issue tracker",
    ])
    assert [n for n, _, _ in forbidden_lines(text)] == [1, 2, 3, 4, 5]


def test_architecture_page_matches_the_code():
    gen = _generator()
    page = gen.PAGE.read_text(encoding="utf-8")
    stale = gen.updated_page(page) != page  # a bool, so that the failure shows the command, not a diff
    assert not stale, (
        "docs/architecture.md is stale (a module, function or docstring changed): "
        "refresh it with `python docs/gen_architecture.py`"
    )


def test_generator_lists_modules_with_their_public_api_and_keeps_the_hand_written_text(tmp_path, monkeypatch):
    gen = _generator()
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "_private.py").write_text('"""A helper."""\ndef helper():\n    """Hidden."""\n')
    (package / "sub" / "__init__.py").write_text('"""Sub package."""\n')
    (package / "sub" / "mod.py").write_text(
        '"""Decode things. More detail\nthat wraps.\n\nA second paragraph."""\n'
        "__all__ = ['Public', 'visible']\n"
        "class Public:\n    '''A public model.\n\n    Details.'''\n"
        "def visible(a, b=1, *args, c, **kw):\n    '''First line, e.g. this. Second sentence.'''\n"
        "def not_exported():\n    pass\n"
        "def _private():\n    pass\n"
    )
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    assert gen.render_package("pkg") == [
        "### `pkg/`",
        "",
        "- **`pkg.sub`**: Sub package.",
        "- **`pkg.sub.mod`**: Decode things.",
        "  - `class Public`: A public model.",
        "  - `visible(a, b, *args, c, **kw)`: First line, e.g. this.",
        "",
    ]
    page = "# Title\n\nhand-written\n\n" + gen.BEGIN + "\nold list\n" + gen.END + "\n\n## After\n"
    new = gen.updated_page(page)
    assert new.startswith("# Title\n\nhand-written\n\n" + gen.BEGIN)
    assert new.endswith(gen.END + "\n\n## After\n")
    assert "old list" not in new
    with pytest.raises(SystemExit, match="markers are missing"):
        gen.updated_page("# no markers\n")


def test_summary_is_the_first_sentence_on_one_line():
    gen = _generator()
    assert gen.summary("One line.") == "One line."
    assert gen.summary("Spans\n  two lines. Then more.\n\nNext paragraph.") == "Spans two lines."
    assert gen.summary("Cites Langer et al. 2024 for it. Done.") == "Cites Langer et al. 2024 for it."
    assert gen.summary(None) == ""
    long = gen.summary("word " * 100)
    assert len(long) == gen.MAX_SUMMARY and long.endswith("…")
