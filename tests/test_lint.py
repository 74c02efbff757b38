"""
Static checks for bugs the other tests may not reach: ruff with pyproject.toml's rules (pyflakes and 120-character
lines). An undefined name in an error path raises NameError only when that path runs, and a user's bad input is
often the first to run it.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    # catches: a name used but never defined or imported (F821), an import or variable left unused (F401, F841), a
    # line over 120 characters
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    result = subprocess.run([ruff, "check", "nanochat", "scripts", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
