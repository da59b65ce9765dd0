"""The project's tooling: every test in exactly one group (tests/groups.py), and `make help` lists every target."""

import ast
import re
import subprocess
from pathlib import Path

from .groups import EXCEPTIONS, FILES, GROUPS

TESTS = Path(__file__).parent
ROOT = TESTS.parent


def _test_functions(path: Path) -> set[str]:
    return {node.name for node in ast.parse(path.read_text()).body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_test_file_has_a_group_and_every_exception_names_a_test_of_its_file():
    files = sorted(p.name for p in TESTS.glob("test_*.py"))
    assert sorted(FILES) == files  # a new file needs its group; a removed one leaves no entry behind
    assert set(FILES.values()) <= set(GROUPS)
    listed = []
    for file, groups in EXCEPTIONS.items():
        assert set(groups) <= set(GROUPS) and FILES[file] not in groups, file  # an exception moves a test elsewhere
        functions = _test_functions(TESTS / file)
        for tests in groups.values():
            assert set(tests) <= functions, f"{file}: no such test {sorted(set(tests) - functions)}"
            listed += [(file, test) for test in tests]
    assert len(listed) == len(set(listed))  # one group per test


def test_every_collected_test_has_exactly_one_group(request):
    items = request.session.items
    assert request.node in items
    for item in items:
        groups = [group for group in GROUPS if item.get_closest_marker(group)]
        assert len(groups) == 1, f"{item.nodeid}: groups {groups}"


def test_make_help_lists_every_target_in_one_line():
    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ")  # continuation lines joined
    phony = re.search(r"^\.PHONY:(.*)$", makefile, re.M).group(1).split()
    out = subprocess.run(["make", "-s", "--no-print-directory", "help"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    listed = [line.split(":", 1)[0].split()[-1] for line in out if ":" in line]
    assert sorted(listed) == sorted(phony), "each target in .PHONY has one `# make <target>: ...` line at the top"
    assert all(len(line) <= 120 for line in out)
