"""Every public function, method and class of the package has a docstring (the house rule: shapes, dtypes, units,
errors raised and the source of a formula — the content is reviewed, its presence is checked here)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "netmorph"


def test_every_public_definition_has_a_docstring():
    missing = []
    definitions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ast.parse(path.read_text(encoding="utf-8"))
        # module-level functions and classes, and the methods of those classes (helpers nested in a function are
        # not public)
        nodes = [node for node in module.body if isinstance(node, definitions)]
        nodes += [member for node in nodes if isinstance(node, ast.ClassDef) for member in node.body
                  if isinstance(member, definitions)]
        for node in nodes:
            if not node.name.startswith("_") and not ast.get_docstring(node):
                missing.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}")
    assert not missing, "public definitions without a docstring:\n" + "\n".join(missing)


def test_docstrings_cite_nothing_outside_the_repository():
    """Sources are papers and public repositories; research notes outside this repository are not."""
    offending = [str(path.relative_to(PACKAGE.parent)) for path in sorted(PACKAGE.rglob("*.py"))
                 if "shared/research" in path.read_text(encoding="utf-8") or "_report.md" in path.read_text(encoding="utf-8")]
    assert not offending, offending
