"""Packaging: the wheel carries the twistd plugin file, and twistd lists both plugins."""

import subprocess
import sys
import zipfile
from pathlib import Path

from tests.harness import tool

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contains_plugin_file_and_no_twisted_init(tmp_path):
    """A plain wheel build ships twisted/plugins/deploy_plugins.py and no twisted/__init__.py."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("deploy-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/deploy_plugins.py" in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert "deploy/supervise.py" in names
    assert any(n.endswith("entry_points.txt") for n in names)


def test_twistd_help_lists_both_plugins():
    """`twistd --help` lists deploy-agent and deploy-proxy."""
    out = subprocess.run([tool("twistd"), "--help"], capture_output=True, text=True, timeout=60)
    assert "deploy-agent" in out.stdout
    assert "deploy-proxy" in out.stdout


def test_no_init_files_in_plugin_dirs():
    """twisted/ and twisted/plugins/ in the source tree stay namespace directories."""
    assert not (ROOT / "twisted" / "__init__.py").exists()
    assert not (ROOT / "twisted" / "plugins" / "__init__.py").exists()
