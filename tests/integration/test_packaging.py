"""`pip install .` material: the wheel carries the package and its console script; the sdist
carries the unit files, the alert rules and the example configuration (their install paths are
in the README)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_sdist_and_wheel_ship_the_package_console_script_units_alerts_and_example_config(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (wheel,) = tmp_path.glob("ca_watchdog-*.whl")
    (sdist,) = tmp_path.glob("ca_watchdog-*.tar.gz")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "ca-watchdog = ca_watchdog.cli:main" in z.read(entry_points).decode()
    for module in ("cli.py", "cscfg.py", "decide.py", "loop.py", "lab/CS.cfg.template", "py.typed"):
        assert f"ca_watchdog/{module}" in names, module
    with tarfile.open(sdist) as t:
        members = {m.name.split("/", 1)[1] for m in t.getmembers() if "/" in m.name}
    for shipped in (
        "systemd/ca-watchdog.service",
        "systemd/pki-tomcatd@.service.d/ca-watchdog.conf",
        "prometheus/alerts.yml",
        "prometheus/alerts_test.yml",
        "config.example.toml",
        "README.md",
    ):
        assert shipped in members, shipped
