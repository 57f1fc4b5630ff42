"""The real torchrun on the CPU (gloo): one node with two processes, and two "nodes" (two
torchrun invocations rendezvousing on localhost) whose working directories differ. No
--out: rank 0 names the run directory and is the only writer."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import torch
from test_reliability import cli_args, subprocess_env, wait_for

from fastmoco.engine.distributed import free_port


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args, "-m", "fastmoco", "train"]


def run_dirs(cwd: Path) -> list[Path]:
    return sorted((cwd / "runs").glob("*")) if (cwd / "runs").is_dir() else []


def steps_logged(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum(json.loads(x)["kind"] == "step" for x in path.read_text().splitlines() if x)


def test_torchrun_one_node_sigterm_and_resume(tiny_data, tmp_path):
    """torchrun --nproc-per-node 2 without --out: one run directory; SIGTERM to torchrun
    stops both ranks at one step with rank 0's checkpoint; --resume auto finishes it."""
    cwd = tmp_path / "job"
    cwd.mkdir()
    args = cli_args(tiny_data, "--epochs", 40)  # stopped long before the end
    proc = subprocess.Popen(
        torchrun("--standalone", "--nproc-per-node", "2") + args,
        cwd=cwd,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: run_dirs(cwd) and steps_logged(run_dirs(cwd)[0]) >= 1, proc=proc)
        proc.send_signal(signal.SIGTERM)  # what a scheduler sends; torchrun passes it on
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    (run,) = run_dirs(cwd)  # every rank agreed on rank 0's directory
    assert "interrupted: checkpoint saved" in out, err[-3000:]
    assert err.count("continue with --resume") == 1  # said once, by rank 0
    stopped = torch.load(run / "checkpoint.pt", weights_only=True)
    assert stopped["global_step"] % 2 == 0  # both ranks stopped at one log boundary

    epochs = stopped["epoch"] + 1  # to the end of the epoch it stopped in
    args[args.index("--epochs") + 1] = str(epochs)
    done = subprocess.run(
        torchrun("--standalone", "--nproc-per-node", "2") + args + ["--resume", "auto"],
        cwd=cwd,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert run_dirs(cwd) == [run]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["global_step"] == 4 * epochs


def test_torchrun_two_nodes_in_different_directories(tiny_data, tmp_path):
    """Two torchrun invocations, --nnodes 2, one process each, different working dirs:
    the run directory exists on node 0 only; node 1 writes nothing; both exit 0."""
    port = str(free_port())
    procs = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir()
        rdzv = ["--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1"]
        rdzv += ["--master-addr", "127.0.0.1", "--master-port", port]
        cmd = torchrun(*rdzv) + cli_args(tiny_data, "--epochs", 1)
        procs.append(
            subprocess.Popen(cmd, cwd=cwd, env=subprocess_env(), stdout=-1, stderr=-1, text=True)
        )
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    (run,) = run_dirs(tmp_path / "node0")
    assert torch.load(run / "checkpoint.pt", weights_only=True)["global_step"] == 4
    assert not run_dirs(tmp_path / "node1")  # no shared disk needed, nothing written there
    assert "run written to" in outs[0][0] and "run written to" not in outs[1][0]


def test_torchrun_usage_error_is_one_message(tiny_data, tmp_path):
    """A bad flag found by rank 0 ends every rank with exit code 2 and one message."""
    res = subprocess.run(
        torchrun("--standalone", "--nproc-per-node", "2")
        + cli_args(tiny_data, "--epochs", 1, "--batch-size", 64, "--queue-size", 256),
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode != 0
    assert res.stderr.count("larger than the dataset") == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr.split("larger than the dataset")[0]
    assert "exitcode  : 2" in res.stderr  # torchrun's summary: the rank's exit code
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pt"))
