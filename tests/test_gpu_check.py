"""benchmarks/gpu_check.sh, the one-GPU check, is at least valid bash (no GPU runs here)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_check_is_valid_bash_and_says_it_is_unmeasured() -> None:
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    header = SCRIPT.read_text().split("\n\n")[0]
    assert "NOT MEASURED" in header  # until it has run on a GPU


def test_bash_n_catches_a_broken_script(tmp_path: Path) -> None:
    broken = tmp_path / "broken.sh"
    broken.write_text(SCRIPT.read_text().replace("fi\n", "", 1))
    assert subprocess.run(["bash", "-n", str(broken)], capture_output=True).returncode != 0
