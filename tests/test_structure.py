"""The code's layout: every module imports only modules below it in data-flow order (function-level
imports included, so no lazy import runs back up), and the guide's map lists exactly those files,
in that order."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def guide_map() -> list[str]:
    """The files of the guide's map of the code, in its order."""
    text = (ROOT / "docs" / "guide.md").read_text()
    section = text.split("## A map of the code", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `(vitlab/[\w/]+\.py)` \|", section, flags=re.M)


def module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def vitlab_imports(path: Path) -> set[str]:
    """The vitlab modules a file imports, anywhere in it ('from vitlab import x' counts as vitlab.x
    when x is a module, else as the package itself)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "vitlab"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vitlab":
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (ROOT / (candidate.replace(".", "/") + ".py")).is_file()
                found.add(candidate if is_module else node.module)
    return found


def test_the_guides_map_lists_every_module():
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "vitlab").rglob("*.py") if p.name != "__init__.py")
    assert sorted(guide_map()) == files


def test_every_module_imports_only_modules_above_it_in_the_map():
    order = [module_name(path) for path in guide_map()]
    for position, path in enumerate(guide_map()):
        for imported in vitlab_imports(ROOT / path):
            assert imported != "vitlab", f"{path} imports the package itself, the top of the house"
            assert imported in order[:position], f"{path} imports {imported}, which is not above it in the map"
