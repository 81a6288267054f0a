"""The configuration reference (docs/configuration.md), generated from the config dataclasses.

Each field's key, type and default are read from its line in the code, its meaning from the line's
trailing `# comment` (comment-only lines right below it continue it), so the reference cannot drift
from the code: tests/test_docs.py checks that the file equals what this module prints.

    .venv/bin/python -m vitlab.config_docs > docs/configuration.md
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
import typing

from vitlab.config import RunConfig

COMMAND = ".venv/bin/python -m vitlab.config_docs > docs/configuration.md"


@dataclasses.dataclass
class FieldDoc:
    name: str
    type: str  # as written in the code, e.g. "int | None"
    default: str  # as written in the code, e.g. "None", '"cifar10"', "1e-5"
    meaning: str  # the trailing comment and its continuation lines, joined


def comments(source: str) -> tuple[dict[int, str], set[int]]:
    """{line: comment text} for every comment, and the lines that hold nothing but a comment."""
    text, code_lines = {}, set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            text[token.start[0]] = token.string.lstrip("#").strip()
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                                tokenize.ENDMARKER):
            code_lines.add(token.start[0])
    return text, {line for line in text if line not in code_lines}


def class_source(cls) -> tuple[str, ast.ClassDef]:
    source = textwrap.dedent(inspect.getsource(cls))
    (classdef,) = ast.parse(source).body
    return source, classdef


def field_docs(cls) -> list[FieldDoc]:
    """The fields of a config dataclass, in order, as its source writes them."""
    source, classdef = class_source(cls)
    comment, alone = comments(source)
    nodes = {n.target.id: n for n in classdef.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    docs = []
    for f in dataclasses.fields(cls):
        if f.name not in nodes:
            raise ValueError(f"{cls.__name__}.{f.name} is not written in {cls.__name__}'s own source")
        node = nodes[f.name]
        meaning = []
        if node.end_lineno in comment and node.end_lineno not in alone:
            meaning.append(comment[node.end_lineno])
            line = node.end_lineno + 1
            while line in alone:  # a comment continued on the lines below belongs to this field
                meaning.append(comment[line])
                line += 1
        default = ast.get_source_segment(source, node.value) if node.value is not None else "(required)"
        factory = re.fullmatch(r"field\(default_factory=lambda: (.*)\)", default)
        if factory:  # a mutable default, made fresh for each config: shown as the value it makes
            default = factory.group(1)
        docs.append(FieldDoc(f.name, ast.get_source_segment(source, node.annotation), default, " ".join(meaning)))
    return docs


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def section(name: str, cls) -> str:
    path = cls.__module__.replace(".", "/") + ".py"
    lines = [f"## `{name}`: `{cls.__name__}`", "",
             f"Defined in [`{path}`](../{path}).", ""]
    docstring = ast.get_docstring(class_source(cls)[1])
    if docstring:
        lines += [docstring, ""]
    lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in field_docs(cls):
        lines.append(f"| `{name}.{f.name}` | `{cell(f.type)}` | `{cell(f.default)}` | {cell(f.meaning)} |")
    return "\n".join(lines) + "\n"


def markdown() -> str:
    """docs/configuration.md: one section per part of RunConfig, one table row per field."""
    sections = typing.get_type_hints(RunConfig)
    intro = f"""# Configuration reference

Generated from the config dataclasses by `{COMMAND}`:
edit the code, not this file (`tests/test_docs.py` fails when the two differ). Each meaning is the
comment beside the field in the code.

A run's config (`RunConfig` in [`vitlab/config.py`](../vitlab/config.py)) has {len(sections)} sections:
{", ".join(f"`{name}`" for name in sections)}. Set a key in a YAML file given to `--config` or in a
preset (`vitlab/presets/*.yaml`), one mapping per section (e.g. `optim: {{lr: 3.0e-4, warmup: 0.05}}`),
or on the command line as `section.key=value` (e.g. `optim.lr=3e-4`). Values are read as YAML, so
Python's `None` is written `null` and `True` / `False` are `true` / `false`; unknown keys and wrongly
typed values are errors. The [guide](guide.md) explains the options in context.
"""
    return "\n".join([intro] + [section(name, cls) for name, cls in sections.items()])


if __name__ == "__main__":
    print(markdown(), end="")
