"""Code shape: at most 400 lines per Python file and 60 lines per function (decorators and
docstring included) under ortho_train/, kernels/ and callbacks/; every offender is listed.

A file past 400 lines holds more than one concern, and a function past 60 lines more than one
step: split them rather than exempt them. `EXEMPT` takes a justified exception, with its reason.
"""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("ortho_train", "kernels", "callbacks")
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60
EXEMPT: dict[str, str] = {}  # "path" or "path::function" -> why it may be longer


def _python_files():
    for folder in FOLDERS:
        yield from sorted((REPO / folder).rglob("*.py"))


def offenders() -> list[str]:
    found = []
    for path in _python_files():
        rel = path.relative_to(REPO).as_posix()
        source = path.read_text()
        lines = len(source.splitlines())
        if lines > MAX_FILE_LINES and rel not in EXEMPT:
            found.append(f"{rel}: {lines} lines (> {MAX_FILE_LINES})")
        for node in ast.walk(ast.parse(source, rel)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                length = node.end_lineno - first + 1
                if length > MAX_FUNCTION_LINES and f"{rel}::{node.name}" not in EXEMPT:
                    found.append(f"{rel}:{node.lineno} {node.name}: {length} lines (> {MAX_FUNCTION_LINES})")
    return found


def test_no_file_or_function_is_too_long():
    found = offenders()
    assert not found, "split these (or exempt them in EXEMPT with a reason):\n" + "\n".join(found)


def test_the_check_counts_what_it_says(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(60))
    tree = ast.parse(f"@decorator\ndef f():\n{body}\n")
    node = tree.body[0]
    assert node.end_lineno - min([node.lineno] + [d.lineno for d in node.decorator_list]) + 1 == 62
