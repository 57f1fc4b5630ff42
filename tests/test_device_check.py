"""The device check proven on CPU: the install line of the GPU machines on a fresh clone, and
bench/device_check.py end to end in its CPU mode (Triton's interpreter, tiny sizes, the same
code paths and output files as on the GPU)."""

import json
import os
import resource
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KERNELS_IMPORT = "import fastmoco.kernels.info_nce, fastmoco.kernels.ema"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OUT")}
    return {**env, **extra}


def _venv_seeing_this_env(path: Path) -> Path:
    """A venv without pip of its own whose sys.path ends with this interpreter's
    site-packages (a .pth file: no download, no copy), so pip, setuptools and torch come
    from here while what gets installed lands in the venv."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    ours.append(sysconfig.get_paths()["purelib"])
    (Path(purelib) / "parent_env.pth").write_text("\n".join(dict.fromkeys(ours)) + "\n")
    return python


def test_fresh_clone_installs_importable_kernels(tmp_path):
    """Finding 1: kernels/ is fastmoco.kernels only through setup.py's package_dir. The old
    GPU script's way (build in place, PYTHONPATH=checkout) cannot import it; the install
    line of bench/install.sh (what bench/device_check.sh and bench/run_gpu.sh run) can."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to clone")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    python = _venv_seeing_this_env(tmp_path / "venv")

    before = subprocess.run(
        [str(python), "-c", KERNELS_IMPORT],
        cwd=tmp_path,
        env=_env(PYTHONPATH=str(clone)),
        capture_output=True,
        text=True,
    )
    assert before.returncode != 0 and "fastmoco.kernels" in before.stderr, before.stderr

    # The extension's build is checked by the suite's own install; here the packaging and
    # the fallback: a 1 s limit stops the build with the extension, the install without it
    # follows.
    log = tmp_path / "install.log"
    env = _env(PYTHON=str(python), INSTALL_TIMEOUT="1")
    env.pop("FASTMOCO_BUILD_EXT", None)
    done = subprocess.run(
        ["bash", str(clone / "bench" / "install.sh"), str(log)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + log.read_text()
    assert done.stdout.startswith("installed: without extension (its build failed"), done.stdout

    probe = (
        KERNELS_IMPORT
        + "; print(fastmoco.kernels.info_nce.__file__, fastmoco.kernels.ema.__file__)"
    )
    after = subprocess.run(
        [str(python), "-c", probe],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    files = after.stdout.split()
    assert files == [str(clone / "kernels" / "info_nce.py"), str(clone / "kernels" / "ema.py")]


def _device_check(tmp_path, *args, prelude: str = "") -> tuple[subprocess.CompletedProcess, Path]:
    """bench/device_check.py --cpu in a fresh process; prelude runs first (to sabotage an op)."""
    out = tmp_path / "out"
    script = ROOT / "bench" / "device_check.py"
    code = "\n".join(
        [
            "import runpy, sys",
            f"sys.argv = [{str(script)!r}, '--cpu', '--out', {str(out)!r}, *{list(args)!r}]",
            prelude,
            f"runpy.run_path({str(script)!r}, run_name='__main__')",
        ]
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=_env(TRITON_INTERPRET="1"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    return done, out


def test_device_check_runs_end_to_end_on_cpu(tmp_path):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done, out = _device_check(tmp_path)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    # CPU seconds, not wall: other jobs on a shared CI machine slow the wall clock, not the
    # work (about 15 s of CPU, 35 s of wall on an idle 2-core machine).
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert cpu < 120, f"the CPU mode took {cpu:.0f} CPU seconds; CI allows 2 minutes"

    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert not [r for r in rows if "error" in r], [r for r in rows if "error" in r]
    checks = [r for r in rows if r["section"] == "check"]
    assert len(checks) >= 35 and all(r["passed"] for r in checks)
    cases = " ".join(r["case"] for r in checks)
    for what in (
        "moco single pass bf16",
        "moco single pass fp32",
        "buf.T",
        "general fp32",
        "in-batch",
        "NT-Xent",
        "ema",
        "unaligned",
        "enqueue",
    ):
        assert what in cases, what
    assert {r["quantity"] for r in checks} >= {"loss", "rank", "dq", "dk", "dqueue", "update"}

    timed = {(r["case"], r["impl"]) for r in rows if r["section"] == "time"}
    impls = {impl for _, impl in timed}
    assert {
        "fused",
        "eager bf16 autocast",
        "eager fp32 reference",
        "_foreach_lerp_",
        "loop (official)",
        "slice (official, host sync)",
    } <= impls
    fused = [r for r in rows if r.get("impl") == "fused"]
    assert all(
        "speedup_vs_autocast" in r and "speedup_vs_fp32" in r and r["x_floor"] > 0 for r in fused
    )
    # The table is printed last and saved, identical, for bench/RESULTS.md.
    table = (out / "results.md").read_text()
    assert done.stdout.rstrip().endswith(table.rstrip())
    assert "| check | quantity | error | tol | result |" in table


def test_device_check_fails_on_a_gradient_off_by_one_percent(tmp_path):
    """The checks are not vacuous: dq scaled by 1.01 (a hook on q) and a momentum update
    that writes nothing both show as failures, and the run exits 1."""
    prelude = (
        "import fastmoco.ops as ops; real = ops.info_nce\n"
        "def scaled(q, *a, **kw):\n"
        "    q.register_hook(lambda g: g * 1.01)\n"
        "    return real(q, *a, **kw)\n"
        "ops.info_nce = scaled; ops.momentum_update_ = lambda *a, **kw: None"
    )
    done, out = _device_check(tmp_path, "--sections", "check", prelude=prelude)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    failed = {(r["case"].split(" N=")[0], r["quantity"]) for r in rows if r.get("passed") is False}
    assert ("moco single pass fp32", "dq") in failed
    assert ("general fp32", "dq") in failed
    assert any(q == "update" for _, q in failed)
    passed = {(r["case"].split(" N=")[0], r["quantity"]) for r in rows if r.get("passed")}
    assert ("moco single pass fp32", "loss") in passed  # only the sabotaged quantities fail
