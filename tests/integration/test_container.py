"""What can be checked of the container without a Docker engine: its config, files, package."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"


def popgate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("POPGATE_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **(env or {})},
    )


def test_the_containers_config_is_valid_and_takes_env_overrides() -> None:
    result = popgate(
        "check-config",
        "-c",
        str(DOCKER / "popgate.toml"),
        env={"POPGATE_UPSTREAM_IMAP_HOST": "imap.example.net"},
    )
    assert result.returncode == 0, result.stderr
    assert 'host = "imap.example.net"' in result.stdout
    assert 'listen = ["0.0.0.0:110"]' in result.stdout


def test_dockerfile_copies_what_exists_and_runs_the_console_script() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    for sources in re.findall(r"^COPY (.+) \S+$", text, flags=re.M):
        for source in sources.split():
            assert (ROOT / source).exists(), source
    assert 'ENTRYPOINT ["popgate"]' in text
    assert "POPGATE_CONFIG=/etc/popgate/popgate.toml" in text
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'popgate = "gateway.cli:main"' in pyproject


def test_the_package_the_image_installs_holds_every_module(tmp_path: Path) -> None:
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q"]
    build = subprocess.run(
        [*pip, "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("popgate-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "gateway").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert modules <= names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "popgate = gateway.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
