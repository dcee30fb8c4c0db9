"""The import layers of README "Architecture", as contracts in pyproject.toml [tool.importlinter], checked by
import-linter (https://github.com/seddonym/import-linter): no cycles between layers, the surgeries independent,
ops/ pure tensor math, the modeling files self-contained."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_hold():
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint_imports, "import-linter is not installed: make install (it is in the test extra)"
    result = subprocess.run([lint_imports, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "4 kept, 0 broken" in result.stdout, result.stdout[-3000:]
