"""Installation: the package metadata pip reads, and training without the optional extras."""

import subprocess
import sys
from pathlib import Path

import pytest

from fastmoco.engine.metrics import MetricsLog, plot_curves

ROOT = Path(__file__).resolve().parents[1]


def test_metadata_marks_triton_linux_only_and_carries_the_license(tmp_path):
    """setup.py's egg_info is what pip installs from: triton only on Linux, tensorboard and
    matplotlib only in the [train] extra, the DALI wheels for CUDA 13 and 12, MIT."""
    env = {"FASTMOCO_BUILD_EXT": "0", "PATH": "/usr/bin:/bin"}
    subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    info = tmp_path / "fastmoco.egg-info"
    requires = (info / "requires.txt").read_text()
    base = requires.split("\n[")[0].split()
    assert "triton" not in " ".join(base) and "tensorboard" not in base
    assert '[:platform_system == "Linux"]\ntriton>=3.0' in requires
    assert "[train]\ntensorboard\nmatplotlib" in requires
    assert "nvidia-dali-cuda130" in requires and "nvidia-dali-cuda120" in requires
    pkg_info = (info / "PKG-INFO").read_text()
    assert "License: MIT" in pkg_info or "License-Expression: MIT" in pkg_info
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_training_records_without_tensorboard_or_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    log = MetricsLog(tmp_path)
    log.log("train", 1, loss=1.5)
    log.close()
    assert '"loss": 1.5' in (tmp_path / "metrics.jsonl").read_text()
    assert not (tmp_path / "tb").exists()
    assert plot_curves([{"epoch": 0, "loss": 1.0}], None, tmp_path / "c.png", "t") is None
    out = capsys.readouterr().out
    assert "TensorBoard not installed" in out and "matplotlib not installed" in out


@pytest.mark.parametrize("module", ["fastmoco.ops", "fastmoco.models"])
def test_ops_import_without_the_training_extras(module):
    code = (
        "import sys; sys.modules['matplotlib'] = None; sys.modules['torch.utils.tensorboard'] "
        f"= None; sys.modules['yaml'] = None; import {module}"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
