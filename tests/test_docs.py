"""The docs against the code: every relative link (and its #anchor) resolves, and every ``bi-compile`` command the
README and docs/ show names a real subcommand with options it has."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

import bi_compile_cli

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE_BLOCK = re.compile(r"```[a-z]*\n(.*?)```", re.S)
INLINE_CODE = re.compile(r"`([^`\n]+)`")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    text = CODE_BLOCK.sub("", doc.read_text())
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def relative_links(doc: Path) -> list[str]:
    return [target for target in LINK.findall(doc.read_text()) if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_relative_links_resolve(doc):
    broken = []
    for target in relative_links(doc):
        path, _, anchor = target.partition("#")
        resolved = (doc.parent / path).resolve() if path else doc
        if not resolved.exists():
            broken.append(f"{target}: no {resolved.relative_to(REPO) if resolved.is_relative_to(REPO) else resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with that anchor")
    assert broken == []


def shown_commands(doc: Path) -> list[str]:
    """``bi-compile ...`` invocations in the doc's code blocks (one per line) and inline code spans."""
    text = doc.read_text()
    lines = [line for block in CODE_BLOCK.findall(text) for line in block.splitlines()]
    spans = INLINE_CODE.findall(CODE_BLOCK.sub("", text))
    return [c.strip() for c in lines + spans if c.strip().startswith("bi-compile ")]


def subcommands() -> dict:
    parser = bi_compile_cli.build_parser()
    return next(action.choices for action in parser._actions if action.dest == "command")


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_shown_commands_exist_with_their_options(doc):
    commands, wrong = subcommands(), []
    for shown in shown_commands(doc):
        words = shlex.split(shown.split("#")[0].split(">")[0].replace("\\|", "|"))
        sub = commands.get(words[1])
        if sub is None:
            wrong.append(f"{shown}: no subcommand {words[1]!r}")
            continue
        options = set(re.findall(r"--[a-z][a-z-]*", " ".join(words[2:])))
        if words[1] == "bench":  # what follows the script's name is the script's own
            options = set()
        wrong += [f"{shown}: {words[1]} has no {option}" for option in sorted(options - set(sub._option_string_actions))]
    assert wrong == []


def test_the_docs_show_every_subcommand():
    shown = {shlex.split(c.replace("\\|", "|"))[1] for doc in DOCS for c in shown_commands(doc)}
    assert set(subcommands()) <= shown
