"""csrc/ compiles with nvcc alone for sm_80 and sm_90a (the check CI runs), and the check fails
on a CUDA source that does not compile. Skipped where nvcc is not installed."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / ".ci" / "compile_csrc.sh"

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")


def _run(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(root / ".ci" / "compile_csrc.sh")], capture_output=True,
                          text=True, timeout=600)


def test_csrc_compiles_for_sm80_and_sm90a():
    result = _run(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for cu in sorted((ROOT / "csrc").glob("*.cu")):
        assert f"{cu.relative_to(ROOT)} -> object" in out
    assert "sm_90a:" in out and "sm_80:" in out
    assert "bytes of SASS" in out and "OK" in out


def test_compile_check_fails_on_a_broken_source(tmp_path):
    (tmp_path / ".ci").mkdir()
    (tmp_path / "csrc").mkdir()
    shutil.copy(SCRIPT, tmp_path / ".ci" / "compile_csrc.sh")
    (tmp_path / "csrc" / "broken.cu").write_text(
        "__global__ void k(float* x) { x[threadIdx.x] = undeclared_name; }\n")
    result = _run(tmp_path)
    assert result.returncode != 0
    assert "undeclared_name" in result.stdout + result.stderr
