"""The JavaScript hosts' shared contract code (hosts/common) against contract/vectors/.

Runs hosts/common/test/*.test.mjs with Node's own test runner (node:test, no npm packages).
Needs `node` (>= 20.10, for JSON import attributes) on PATH.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "hosts" / "common" / "test"


def test_hosts_common_unit_tests():
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH: the hosts/common tests need Node.js >= 20.10")
    assert sorted(TESTS.glob("*.test.mjs")), f"no *.test.mjs in {TESTS}"
    r = subprocess.run([node, "--test", str(TESTS)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"node --test {TESTS.relative_to(ROOT)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
