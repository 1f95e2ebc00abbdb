"""The package's layout rule: the library never imports the book (c2srepro.book)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "c2srepro"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_library_module_imports_the_book():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if (PACKAGE / "book") in path.parents:
            continue
        for name in imported_modules(path):
            if name == "c2srepro.book" or name.startswith("c2srepro.book."):
                offenders.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert not offenders, "library modules must not import the book package:\n" + "\n".join(offenders)


def test_the_import_check_sees_a_book_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from c2srepro.book import stages\n")
    assert "c2srepro.book.stages" in imported_modules(module)
