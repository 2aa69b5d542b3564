"""The project stands alone (issue 14 §3): nothing a user clones refers to the shared directory that sat
beside the checkout during development, CI starts its own Slurm, and the peer comparison is optional."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tracked_files() -> list[Path]:
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [ROOT / name for name in out.stdout.splitlines() if (ROOT / name).is_file()]


def test_no_file_refers_to_a_shared_directory_outside_the_project():
    needle = "../" + "shared"  # split, so this file does not match itself
    offenders = []
    for path in _tracked_files():
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        offenders += [f"{path.relative_to(ROOT)}:{i}" for i, line in enumerate(text.splitlines(), 1) if needle in line]
    assert not offenders, offenders


def test_ci_uses_the_projects_own_slurm_script():
    run = (ROOT / ".ci" / "run").read_text()
    assert "bash .ci/local_slurm.sh" in run and "bash .ci/local_slurm.sh stop" in run
    assert subprocess.run(["bash", "-n", str(ROOT / ".ci" / "local_slurm.sh")]).returncode == 0
    bad = subprocess.run(["bash", str(ROOT / ".ci" / "local_slurm.sh"), "restart-everything"], capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 2 and "usage:" in bad.stderr


@pytest.mark.skipif(importlib.util.find_spec("ptyrad") is not None, reason="PtyRAD is installed: the comparison runs")
def test_peer_comparison_is_skipped_when_ptyrad_is_absent(monkeypatch):
    monkeypatch.delenv("PTYRAD_PYTHON", raising=False)
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "compare_ptyrad.py")], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "PtyRAD is not installed here: comparison skipped" in run.stdout, run
    named = subprocess.run([sys.executable, str(ROOT / "bench" / "compare_ptyrad.py"), "--ptyrad-python",
                            sys.executable], capture_output=True, text=True, timeout=300)
    assert named.returncode != 0 and "cannot 'import ptyrad.solver'" in named.stderr, named
