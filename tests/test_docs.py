"""The docs stay true: the configuration reference matches the code, the guide's synopsis names every
command and option the CLI has, and every relative link and image in README.md and docs/*.md points
to a file that exists."""

import argparse
import re
from pathlib import Path

import pytest

from vitlab import config_docs
from vitlab.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)  # fenced blocks and inline code: not links
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")  # [text](target) and ![alt](target "title")


def test_configuration_reference_matches_the_code():
    written = (ROOT / "docs" / "configuration.md").read_text()
    assert written == config_docs.markdown(), (
        f"docs/configuration.md is out of date with the config dataclasses: run `{config_docs.COMMAND}`"
    )


def test_the_guides_synopsis_names_every_command_and_option():
    guide = (ROOT / "docs" / "guide.md").read_text()
    synopsis = guide.split("```text", 1)[1].split("```", 1)[0]
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, parser in commands.items():
        lines = re.findall(rf"^vitlab {name} .*(?:\n {{8,}}.*)*", synopsis, re.MULTILINE)  # with continuations
        options = {o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
        missing = sorted(o for o in options if not any(re.search(rf"{o}\b", line) for line in lines))
        assert lines and not missing, f"docs/guide.md's synopsis of `vitlab {name}` lacks {missing or 'the command'}"


def relative_links(page: Path) -> list[str]:
    targets = LINK.findall(CODE.sub("", page.read_text()))
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:|#", t)]  # not http:, mailto:, #anchor


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_point_to_files(page):
    missing = [t for t in relative_links(page) if not (page.parent / t.split("#")[0]).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to files that do not exist: {', '.join(missing)}"
