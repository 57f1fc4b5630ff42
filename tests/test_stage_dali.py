"""tools/stage_dali.py, the recipe that carries DALI's wheels to the GPU machine in parts:
its download line matches the device machine's (Python 3.12, x86_64 manylinux), and the
parts join back into byte-identical wheels, with a clear error while one is missing."""

import hashlib
import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def stage(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("stage_dali", ROOT / "tools" / "stage_dali.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "STAGE", tmp_path / "dali")
    monkeypatch.setattr(module, "WHEELS", tmp_path / "dali" / "wheels")
    return module


def _fake_wheels(folder: Path, sizes: dict[str, int]) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    digests = {}
    for name, size in sizes.items():
        data = os.urandom(size)
        (folder / name).write_bytes(data)
        digests[name] = hashlib.sha256(data).hexdigest()
    return digests


def test_download_line_targets_the_device_python(stage, monkeypatch):
    """The pip download line the device README gives: no deps, binary only, CPython 3.12
    (the H200 machine's python3), the manylinux x86_64 platforms."""
    seen = {}

    def fake_run(cmd, check):
        seen["cmd"] = cmd
        _fake_wheels(stage.WHEELS, {"nvidia_dali_cuda130-2.4.0-py3-none-any.whl": 10})

    monkeypatch.setattr(stage.subprocess, "run", fake_run)
    stage.download()
    cmd = " ".join(seen["cmd"])
    for part in ("pip download", "--no-deps", "--only-binary=:all:", "--python-version 3.12",
                 "--implementation cp", "--platform manylinux_2_28_x86_64",
                 "--platform manylinux2014_x86_64", "nvidia-dali-cuda130=="):  # fmt: skip
        assert part in cmd, part


def test_parts_join_into_identical_wheels(stage):
    sizes = {"a-1.0-py3-none-any.whl": 2500, "b-2.0-py3-none-any.whl": 700, "c-3-py3.whl": 1}
    digests = _fake_wheels(stage.WHEELS, sizes)
    folders = stage.split(sorted(stage.WHEELS.glob("*.whl")), part_bytes=1000)
    assert len(folders) == 4  # 3201 bytes in parts of at most 1000
    for folder in folders:
        assert sum(f.stat().st_size for f in folder.iterdir() if f.suffix != ".json") <= 1000
    for wheel in stage.WHEELS.iterdir():  # as on the GPU machine: only the parts arrived
        wheel.unlink()

    manifest = stage._manifest()
    assert stage.missing_parts(manifest) == []
    joined = stage.join(manifest)
    assert {w.name: hashlib.sha256(w.read_bytes()).hexdigest() for w in joined} == digests


def test_missing_part_is_named(stage):
    _fake_wheels(stage.WHEELS, {"a-1.0-py3-none-any.whl": 2500})
    folders = stage.split(sorted(stage.WHEELS.glob("*.whl")), part_bytes=1000)
    last = folders[-1]
    for f in last.iterdir():
        f.unlink()
    last.rmdir()
    assert stage.missing_parts(stage._manifest()) == [last.name]
    with pytest.raises(SystemExit, match=last.name):
        stage.main(["install"])


def test_damaged_piece_fails_the_checksum(stage):
    _fake_wheels(stage.WHEELS, {"a-1.0-py3-none-any.whl": 2500})
    folders = stage.split(sorted(stage.WHEELS.glob("*.whl")), part_bytes=1000)
    (stage.WHEELS / "a-1.0-py3-none-any.whl").unlink()
    piece = next(f for f in folders[1].iterdir() if f.suffix != ".json")
    data = piece.read_bytes()
    piece.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    with pytest.raises(SystemExit, match="SHA-256"):
        stage.join(stage._manifest())
