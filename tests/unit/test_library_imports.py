"""The library does not look up: no module under e3/ imports services/, at top level or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[2] / "e3"


def imports_of_services(path: Path) -> list[str]:
    """'line N: statement' for every import of services (or services.*) anywhere in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        if any(name == "services" or name.startswith("services.") for name in names):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_of_the_library_imports_the_services():
    files = sorted(LIBRARY.rglob("*.py"))
    assert len(files) > 20, f"found only {len(files)} modules under {LIBRARY}"
    offenders = {str(f.relative_to(LIBRARY.parent)): hits for f in files if (hits := imports_of_services(f))}
    assert not offenders, f"e3/ must not depend on services/: {offenders}"


def test_the_check_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from services.launcher import run_training\n    import services.bench as b\n")
    assert imports_of_services(module) == ["line 4: from services.launcher import run_training",
                                           "line 5: import services.bench as b"]


def test_python_m_e3_says_in_one_line_where_the_command_went():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "e3", "run", "--steps", "2"], cwd=LIBRARY.parent,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr == "e3: the command line moved: run `e3 run --steps 2` or `python -m services run --steps 2`\n"
