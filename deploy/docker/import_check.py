#!/usr/bin/env python3
"""Build-time smoke test of an image: import everything a service can import.

    e3-import-check MODULE_OR_FILE...

Starting from each entry (a module such as services.trainer.__main__, or a
script file), every first-party module (e3, services) it reaches through
`import` statements, function-level ones included, is imported, and so is
every third-party top-level module those name (string constants naming a
first-party module count: the reward service loads its checkers by name). A missing package, a
version without a name the code imports, or stubs that refuse the installed
grpcio or protobuf fail here, in `docker build`, and not in a pod.
Exit 0 when all imported, 1 naming each failure.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
import traceback
from pathlib import Path

FIRST_PARTY = ("e3", "services")


def _source_of(entry: str) -> tuple[str | None, Path | None]:
    if Path(entry).is_file():
        return None, Path(entry)
    spec = importlib.util.find_spec(entry)
    return entry, Path(spec.origin) if spec and spec.origin and spec.origin.endswith(".py") else None


def _imported_names(module: str | None, path: Path) -> list[str]:
    out = []
    package = (module if path.name == "__init__.py" else (module or "").rpartition(".")[0]) or ""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            name = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            out.append(name)
            out += [f"{name}.{alias.name}" for alias in node.names]  # submodules named in `from x import y`
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                node.value.split(".")[0] in FIRST_PARTY and node.value.replace(".", "").replace("_", "").isalnum():
            out.append(node.value)  # importlib.import_module("e3.verify.math") and the like
    return out


def reachable(entries: list[str]) -> tuple[list[str], set[str]]:
    """(first-party modules, third-party top-level names) the entries can import."""
    first, third, todo, seen = [], set(), list(entries), set()
    while todo:
        entry = todo.pop()
        if entry in seen:
            continue
        seen.add(entry)
        try:
            module, path = _source_of(entry)
        except (ImportError, ValueError):
            module, path = entry, None  # `from pkg import name` where name is no module
        if path is None:
            continue
        if module:
            first.append(module)
        for name in _imported_names(module, path):
            top = name.split(".")[0]
            if top in FIRST_PARTY:
                todo.append(name)
            elif top and top not in sys.stdlib_module_names and top != "__future__":
                third.add(top)
    return first, third


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    failures = []
    for entry in argv:
        try:
            if _source_of(entry)[1] is None:
                failures.append(f"{entry}: no such module or file")
        except (ImportError, ValueError) as exc:
            failures.append(f"{entry}: {exc}")
    first, third = reachable(argv)
    for name in sorted(third) + sorted(set(first)):
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - report every failure, then fail
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            traceback.print_exc(limit=2)
    for failure in failures:
        print(f"e3-import-check: cannot import {failure}", file=sys.stderr)
    print(f"e3-import-check: {len(set(first))} e3 modules, {len(third)} third-party packages; "
          f"{'FAILED' if failures else 'all import'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
