"""The MAP (MONAI Application Package, issue 15 item 5): built with ``monai-deploy package`` and run on a real
example, where a Docker daemon answers; skipped, saying why, where none does (the test machines have the Docker
client only, and no registry the base images come from)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EXAMPLE, REPO

from spinepath import __version__

TAG = f"spinepath:{__version__}"
#: The image ``monai-deploy package`` names for that tag and platform (the README's ``docker run``).
IMAGE = f"spinepath-x64-workstation-dgpu-linux-amd64:{__version__}"


def _docker_problem() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return "no docker command"
    r = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=60)
    if r.returncode != 0 or not r.stdout.strip():
        return f"no Docker daemon answers (`docker info`: {(r.stderr or r.stdout).strip().splitlines()[-1:]})"
    return None


def package_command(models: Path = REPO / "bundle" / "models") -> list[str]:
    """The README's packaging command."""
    cli = Path(sys.executable).parent / "monai-deploy"
    return [str(cli), "package", "app.py", "-c", "app.yaml", "-t", TAG, "--platform", "x86_64", "-m", str(models),
            "--add", "spinepath", "--add", "operators"]


def test_readme_gives_the_packaging_command():
    readme = (REPO / "README.md").read_text()
    assert "monai-deploy package app.py -c app.yaml -t spinepath:" + __version__ in readme
    assert "--add spinepath --add operators" in readme and IMAGE in readme


def test_map_builds_and_runs_on_a_real_example(tmp_path):
    problem = _docker_problem()
    if problem:
        pytest.skip(f"MAP not built: {problem}")
    r = subprocess.run(package_command(), cwd=REPO, capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run(["docker", "run", "--rm", "-v", f"{EXAMPLE}:/var/holoscan/input:ro",
                        "-v", f"{out}:/var/holoscan/output", IMAGE], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "status.json").read_text())["ok"] is True
    assert (out / "dicom" / "sr.dcm").is_file() and (out / "dicom" / "seg.dcm").is_file()
