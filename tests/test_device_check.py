"""The device check proven on CPU: the install line of the GPU machines on a fresh clone, and
bench/device_check.py end to end in its CPU mode (Triton's interpreter, tiny sizes, the same
code paths and output files as on the GPU), its failure rules (a kernel fallback, a graph
row that ran eagerly, the trainer's log) and its time budget."""

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
    """kernels/ is fastmoco.kernels only through setup.py's package_dir. The old
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


def _device_check(
    tmp_path, *args, prelude: str = "", env: dict | None = None
) -> tuple[subprocess.CompletedProcess, Path]:
    """bench/device_check.py --cpu in a fresh process; prelude runs first (to sabotage an op);
    env: extra environment variables."""
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
        env=_env(TRITON_INTERPRET="1", **(env or {})),
        capture_output=True,
        text=True,
        timeout=900,
    )
    return done, out


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_device_check_runs_end_to_end_on_cpu(tmp_path):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done, out = _device_check(tmp_path)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    # CPU seconds, not wall: other jobs on a shared CI machine slow the wall clock, not the
    # work (about 45 s of CPU on an idle 2-core machine, 100 s beside other jobs, whose
    # contention makes torch's CPU threads spin; the train section's two runs are the most).
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert cpu < 150, f"the CPU mode took {cpu:.0f} CPU seconds; CI allows 2.5 minutes"

    rows = _rows(out)
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
    # The new sections ran their code paths, in order, and passed.
    order = list(dict.fromkeys(r["section"] for r in rows))
    assert order == ["env", "check", "time", "parity", "step", "train", "ddp"], order
    assert not [r for r in rows if "skipped" in r or r.get("kernel_failures")]
    parity = [r for r in rows if r["section"] == "parity"]
    assert [r["case"] for r in parity] == [
        "test_step_object_is_the_plain_loop_bit_for_bit[membank]",
        "pytest tests/test_step.py",
    ]
    assert all(r["passed"] for r in parity) and parity[0]["value"].startswith("passed")
    steps = [r for r in rows if r["section"] == "step"]
    assert steps and all(r["passed"] for r in steps)
    eager = [r for r in steps if r["impl"].startswith("fastmoco eager")]
    assert eager and all(
        r["use_graph"] is False and r["graph_reason"] == "--cuda-graph off" for r in eager
    )
    assert all("spread" in r and "trust" in r for r in steps)
    train = {(r["case"], r["quantity"]): r for r in rows if r["section"] == "train"}
    assert all(r["passed"] for r in train.values()), [r for r in train.values() if not r["passed"]]
    assert {q for _, q in train} >= {
        "exit status", "step line", "kernel fallbacks", "saved after (step, of its epoch)",
        "epoch loss, kNN top-1 %", "resume line", "windows of finite loss",
        "loss, first -> last third",
    }  # fmt: skip
    assert train[("run 1", "step line")]["value"] == "step: eager (--cuda-graph off)"
    ddp = [r for r in rows if r["section"] == "ddp"]
    assert {r["quantity"] for r in ddp} == {
        "parameters", "parameter change", "queue", "queue pointer", "kernel fallbacks"
    }  # fmt: skip
    assert all(r["passed"] for r in ddp) and all(r["case"].startswith("gloo") for r in ddp)
    assert (out / "subprocesses.log").is_file()

    # The table is printed last and saved, identical, for bench/RESULTS.md.
    table = (out / "results.md").read_text()
    assert done.stdout.rstrip().endswith(table.rstrip())
    assert "| check | quantity | error | tol | result |" in table
    assert "| section | check | quantity | measured | want | result |" in table
    assert "/tmp" not in table and str(tmp_path) not in table  # no paths of this machine


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


def _fake_step_rows(graph_used: bool, plant_failure: bool = False) -> str:
    """A prelude that replaces the step benchmark with three made-up rows (nothing is
    measured: seconds, not a training step), the graph row having used its graph or not;
    plant_failure: a kernel fallback recorded the way FusedKernels records one."""
    plant = (
        "from fastmoco.ops._common import FusedKernels\n"
        "FusedKernels.instances[0].failed[('cuda:0', 'torch.bfloat16', 128)] = "
        "'RuntimeError: Triton Error [CUDA]: planted'\n"
    )
    return (
        "import fastmoco.ops, fastmoco.experiments.step_bench as sb\n"
        "def fake(size, device, **kw):\n"
        + ("    " + plant.replace("\n", "\n    ") if plant_failure else "")
        + "\n    base = dict(size=str(size), sec=0.1, spread=0.01, peak=0, images_per_s=80.0,\n"
        "                speedup=1.0, trust='')\n"
        "    return [dict(base, row='official (fp32)'),\n"
        "            dict(base, row='fastmoco eager AMP bf16, queue bf16', use_graph=False,\n"
        "                 graph_reason='--cuda-graph off'),\n"
        "            dict(base, row='fastmoco graph AMP bf16, queue bf16',\n"
        f"                 use_graph={graph_used!r}, graph_reason="
        + (
            "'the whole step is captured')]\n"
            if graph_used
            else "'capture failed (RuntimeError: planted); eager from here')]\n"
        )
        + "sb.bench_size = fake\n"
    )


def test_a_graph_row_that_ran_eagerly_fails(tmp_path):
    done, out = _device_check(tmp_path, "--sections", "step", prelude=_fake_step_rows(False))
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    steps = {r["impl"]: r for r in _rows(out) if r["section"] == "step"}
    graph = steps["fastmoco graph AMP bf16, queue bf16"]
    assert graph["passed"] is False and graph["use_graph"] is False
    assert graph["why"] == (
        "the graph row ran eagerly (capture failed (RuntimeError: planted); eager from here)"
    )
    assert (
        steps["official (fp32)"]["passed"]
        and steps["fastmoco eager AMP bf16, queue bf16"]["passed"]
    )
    table = (out / "results.md").read_text()
    assert "| FAIL: the graph row ran eagerly (capture failed" in table


def test_rows_measured_after_a_kernel_fallback_fail(tmp_path):
    """The fallback rule: once kernel_failures() is non-empty, every step row fails and
    names the failure, the graph row that did use its graph included."""
    prelude = _fake_step_rows(True, plant_failure=True)
    done, out = _device_check(tmp_path, "--sections", "step", prelude=prelude)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    steps = [r for r in _rows(out) if r["section"] == "step"]
    assert len(steps) == 3 and not any(r["passed"] for r in steps)
    planted = {"('cuda:0', 'torch.bfloat16', 128)": "RuntimeError: Triton Error [CUDA]: planted"}
    assert all(list(r["kernel_failures"].values()) == [planted] for r in steps), steps[0]
    assert "FAIL: kernel fallback" in (out / "results.md").read_text()


def test_sections_past_the_budget_are_skipped(tmp_path):
    """No section starts after DEVICE_CHECK_LAST_START: each gets a row saying why, the
    run still writes its table, and a skip fails nothing."""
    done, out = _device_check(
        tmp_path, "--sections", "env,train,ddp", env={"DEVICE_CHECK_LAST_START": "0"}
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    skipped = [r for r in _rows(out) if "skipped" in r]
    assert [r["section"] for r in skipped] == ["train", "ddp"]
    assert all("no section starts after 0 s" in r["skipped"] for r in skipped)
    assert "Sections skipped (the time budget):" in (out / "results.md").read_text()


TRAIN_CHECKS = r"""
import json, runpy, sys
m = runpy.run_path(sys.argv[1], run_name="device_check")
m["train_checks"].__globals__["CUDA"] = True  # the GPU's rules: the step line says CUDA graph

def log(run, losses, step_line="step: CUDA graph (the whole step is captured; ...)", extra=""):
    first = 0 if run == 1 else 20
    lines = [step_line]
    if run == 2:
        lines.insert(0, "resume: RUN/checkpoint.pt (saved after step 20): continuing at epoch 3, "
                        "step 1")
    for i, loss in enumerate(losses):
        step = first + 2 * (i + 1)
        lines.append(f"step {step} | epoch {(step - 1) // 10 + 1}/3 {(step - 1) % 10 + 1}/10 | "
                     f"loss {loss} | lr 0.06 | 100 img/s")
        if step % 10 == 0:
            lines.append(f"epoch {step // 10}/3: loss {loss}, kNN top-1 20.00% (1.0 s)")
    return "\n".join(lines + [extra]) + "\n"

# the first window is low (a queue of random keys), then the loss falls, or rises
falling = [1.5] + [3.5 - 0.05 * i for i in range(14)]
rising = [1.5] + [2.8 + 0.05 * i for i in range(14)]
good = dict(out1=log(1, falling[:10]), out2=log(2, falling[10:]),
            saved={"global_step": 16, "step_in_epoch": 6}, fill_steps=2)
cases = {
    "healthy": {},
    "rising": dict(out1=log(1, rising[:10]), out2=log(2, rising[10:])),
    "nan": dict(out2=log(2, falling[10:13] + ["nan", 3.0])),
    "capture failed": dict(out2=log(2, falling[10:], extra="step: eager (capture failed (X))")),
    "fallback": dict(out1=log(1, falling[:10], extra="fastmoco: the Triton info_nce kernels "
                              "cannot run here for ('cuda:0', ...)")),
    "saved at the epoch's end": dict(saved={"global_step": 20, "step_in_epoch": 0}),
    "no resume line": dict(out2=log(2, falling[10:]).split("\n", 1)[1]),
    "eager step line": dict(out1=log(1, falling[:10], step_line="step: eager (--cuda-graph off)")),
}
print(json.dumps({name: [(r[1], r[4]) for r in m["train_checks"](**{**good, **c})]
                  for name, c in cases.items()}))
"""


def test_the_trainer_checks_reject_what_they_should():
    """train_checks (the train section's verdict) on made-up logs under the GPU's rules: a
    healthy pair passes every check; each fault fails the check that names it and no other."""
    done = subprocess.run(
        [sys.executable, "-c", TRAIN_CHECKS, str(ROOT / "bench" / "device_check.py")],
        env=_env(TRITON_INTERPRET="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    failed = {name: [q for q, ok in rows if not ok] for name, rows in got.items()}
    assert failed == {
        "healthy": [],
        "rising": ["loss, first -> last third"],
        "nan": ["windows of finite loss", "loss, first -> last third"],
        "capture failed": ["step line"],
        "fallback": ["kernel fallbacks"],
        "saved at the epoch's end": ["saved after (step, of its epoch)"],
        "no resume line": ["resume line"],
        "eager step line": ["step line"],
    }
