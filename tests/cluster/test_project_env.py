"""Every process of the project finds the tools of the interpreter's environment first on ``PATH``."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from cluster.local import apply_project_env, project_env


def test_the_interpreters_ninja_comes_first_and_applying_twice_adds_nothing(monkeypatch):
    bin_dir = str(Path(sys.executable).parent)
    # A PATH where the system's tools come first, as a shell without the venv activated has it.
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", "/bin", bin_dir]))
    env = project_env()
    assert env["PATH"].split(os.pathsep) == [bin_dir, "/usr/bin", "/bin"]
    # DeepSpeed builds its CPU op with the ninja found first: the one installed beside the interpreter.
    assert shutil.which("ninja", path=env["PATH"]) == str(Path(bin_dir) / "ninja")
    apply_project_env()
    apply_project_env()
    assert os.environ["PATH"] == env["PATH"]
