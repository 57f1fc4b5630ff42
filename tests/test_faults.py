"""Faults that end in one clear line: the run lock across deaths and pid namespaces, saves
the disk refuses (full, read-only), the preflight of --out, dead loader workers and lost
peers, the limits of --on-nonfinite skip, torn files set aside, and the run --resume auto
picks. docs/reliability.md lists each fault with the test that injects it."""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Dataset

from fastmoco.engine import checkpoint as ckpt
from fastmoco.engine import faults
from fastmoco.engine.distributed import free_port
from fastmoco.engine.guard import DropLimits, DroppedStepsError, NonFiniteError, NonFiniteGuard
from fastmoco.errors import UsageError

REPO = Path(__file__).parents[1]


def child_env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def small_state(step: int, n: int = 16 * 1024) -> dict:
    """A checkpoint-like state of n float32 values (64 KiB by default)."""
    g = torch.Generator().manual_seed(step)
    return {"global_step": step, "w": torch.randn(n, generator=g)}


def mounted_tmpfs(path: Path, size: str) -> Path:
    """A tmpfs of `size` at path (root only); skips the test where mounting is refused."""
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    return path


@pytest.fixture
def tmpfs(tmp_path):
    """A 2 MiB tmpfs (unmounted after the test)."""
    fs = mounted_tmpfs(tmp_path / "fs", "2m")
    yield fs
    subprocess.run(["umount", "-l", str(fs)], check=False)


# --- the run lock (point 3) ---------------------------------------------------------------
HOLD = """
import os, sys, time
from fastmoco.engine.checkpoint import RunLock
RunLock().acquire(sys.argv[1])
print("holding as pid", os.getpid(), flush=True)
time.sleep(600)
"""
TAKE = """
import os, sys
from fastmoco.engine.checkpoint import RunLock
RunLock().acquire(sys.argv[1])
print("took it as pid", os.getpid(), flush=True)
os._exit(0)  # no release: a second death, this one at once
"""


def unshare_works() -> str | None:
    """None where `unshare -pf --mount-proc` runs (root, as the CI), else why not."""
    if shutil.which("unshare") is None:
        return "no unshare command"
    done = subprocess.run(["unshare", "-pf", "--mount-proc", "true"], capture_output=True)
    return None if done.returncode == 0 else f"unshare -pf refused: {done.stderr.decode()[:200]}"


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def test_lock_is_taken_over_after_a_pid_namespace_requeue(tmp_path):
    """A run is pid 1 of its container; killed and requeued, the new one is pid 1 again.
    A pid test finds "pid 1" alive; the flock the kernel released says the truth."""
    why = unshare_works()
    if why is not None:
        pytest.skip(why)
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        ["unshare", "-pf", "--mount-proc", sys.executable, "-c", HOLD, str(run)],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "holding as pid 1", holder.stderr.read()
        with pytest.raises(UsageError) as refused:  # a live holder: refused, named
            ckpt.RunLock().acquire(run)
        msg = str(refused.value)
        assert f"host {socket.gethostname()}, pid 1, since " in msg and "in use" in msg, msg
        (inner,) = children(holder.pid)  # pid 1 in there, this pid out here
        os.kill(inner, signal.SIGKILL)
        holder.wait(timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    owner = json.loads((run / ckpt.LOCK_NAME).read_text())
    assert owner["pid"] == 1 and ckpt._pid_alive(1)  # what the old pid test refused on
    took = subprocess.run(
        ["unshare", "-pf", "--mount-proc", sys.executable, "-c", TAKE, str(run)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert took.returncode == 0 and "took it as pid 1" in took.stdout, took.stderr
    lock = ckpt.RunLock()
    lock.acquire(run)  # and from this namespace, after that second death
    assert json.loads((run / ckpt.LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run / ckpt.LOCK_NAME).exists()


@pytest.mark.parametrize("content", [b"", b'{"host": "', b"\x00" * 7])
def test_empty_or_torn_lock_file_is_taken_over(tmp_path, content):
    """A kill or a full disk between the lock's create and its write left it empty: no
    one holds it, so it is taken (it was refused for ever, "host ?, pid ?")."""
    (tmp_path / ckpt.LOCK_NAME).write_bytes(content)
    lock = ckpt.RunLock()
    lock.acquire(tmp_path)
    assert json.loads((tmp_path / ckpt.LOCK_NAME).read_text())["pid"] == os.getpid()
    with pytest.raises(UsageError, match=f"pid {os.getpid()}, since"):
        ckpt.RunLock().acquire(tmp_path)
    lock.release()
    assert not (tmp_path / ckpt.LOCK_NAME).exists()


FORK_AND_DIE = """
import os, signal, sys, time
from fastmoco.engine.checkpoint import RunLock
RunLock().acquire(sys.argv[1])
child = os.fork()
if child == 0:  # a loader worker's fork: it outlives its parent for a while
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 1), os.dup2(quiet, 2)  # not holding the test's pipes open
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_lock_ends_with_its_holder_not_with_its_forked_workers(tmp_path):
    """A forked child closes its copy of the lock at once: a killed run's loader worker,
    still alive, does not keep the requeue out."""
    proc = subprocess.run(
        [sys.executable, "-c", FORK_AND_DIE, str(tmp_path)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    worker = int(proc.stdout.strip())
    try:
        os.kill(worker, 0)  # the worker is alive ...
        lock = ckpt.RunLock()
        lock.acquire(tmp_path)  # ... and the lock is free
        lock.release()
    finally:
        os.kill(worker, signal.SIGKILL)


def test_lock_without_flock_falls_back_to_the_pid(tmp_path, monkeypatch, capsys):
    """A filesystem without flock: the lock is an exclusive file naming its owner; a live
    owner is refused, an empty file is a dead writer's once it is a minute old."""

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(ckpt.fcntl, "flock", no_flock)
    lock = ckpt.RunLock()
    lock.acquire(tmp_path)
    assert "no file locks" in capsys.readouterr().out
    with pytest.raises(UsageError, match=f"pid {os.getpid()}.*delete"):
        ckpt.RunLock().acquire(tmp_path)
    lock.release()
    path = tmp_path / ckpt.LOCK_NAME
    path.write_bytes(b"")
    with pytest.raises(UsageError, match="has not recorded"):  # being written, maybe
        ckpt.RunLock().acquire(tmp_path)
    old = time.time() - 2 * ckpt._EMPTY_LOCK_STALE_S
    os.utime(path, (old, old))
    ckpt.RunLock().acquire(tmp_path)  # left empty long ago: taken over


# --- saves the disk refuses (point 4) --------------------------------------------------------
def assert_one_line_save_error(err, run: Path, cause: str, kept: str):
    msg = str(err)
    assert isinstance(err, ckpt.SaveError) and err.exit_code == faults.EXIT_REQUEUE == 75
    assert "\n" not in msg and cause in msg, msg
    assert f"the newest complete checkpoint, {run / kept}, is kept" in msg, msg
    assert f"--resume {run}" in msg, msg
    assert faults.classify(err) == faults.Fault(msg, 75)
    assert not list(run.glob(".*.tmp*"))  # the temp file is removed


def test_disk_full_during_a_save_on_a_small_tmpfs(tmpfs):
    """--out on a 2 MiB tmpfs: the save that does not fit ends in one line naming the full
    disk and the newest complete checkpoint, which still loads; nothing older is lost."""
    ckpt.save_checkpoint(small_state(1), tmpfs)
    ckpt.save_checkpoint(small_state(2), tmpfs)
    with pytest.raises(ckpt.SaveError) as e:
        ckpt.save_checkpoint(small_state(3, n=1024 * 1024), tmpfs)  # 4 MiB
    assert_one_line_save_error(e.value, tmpfs, "the disk holding", "checkpoint.pt")
    assert "No space left on device" in str(e.value) or "stopped short" in str(e.value)
    newest, prev = ckpt.existing_chain(tmpfs)
    assert ckpt.load_checkpoint(newest)["global_step"] == 2
    assert ckpt.load_checkpoint(prev)["global_step"] == 1
    assert torch.equal(ckpt.load_checkpoint(newest)["w"], small_state(2)["w"])
    ckpt.save_checkpoint(small_state(4), tmpfs)  # the space came back with the temp file


def test_disk_full_injected(tmp_path, monkeypatch):
    """The same path without a tmpfs: fsync reports ENOSPC (as ext4 and NFS do for
    delayed writes), then torch.save's own short-write error, which hides the errno."""
    run = tmp_path / "run"
    ckpt.save_checkpoint(small_state(1), run)
    fsync = os.fsync

    def full_on_temp_files(fd):
        if "/.checkpoint.pt.tmp" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", full_on_temp_files)
    with pytest.raises(ckpt.SaveError) as e:
        ckpt.save_checkpoint(small_state(2), run)
    assert_one_line_save_error(e.value, run, "is full", "checkpoint.pt")
    assert "ENOSPC" in str(e.value) and e.value.kind == "full"
    monkeypatch.setattr(os, "fsync", fsync)

    def short_write(obj, f):
        f.write(b"PK\x03\x04 half an archive")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", short_write)
    with pytest.raises(ckpt.SaveError) as e:
        ckpt.save_checkpoint(small_state(2), run)
    assert_one_line_save_error(e.value, run, "torch.save stopped short", "checkpoint.pt")
    assert "free there" in str(e.value)
    assert ckpt.load_checkpoint(run / "checkpoint.pt")["global_step"] == 1
    assert ckpt.existing_chain(run) == [run / "checkpoint.pt"]


def test_read_only_out_on_a_remounted_tmpfs(tmpfs):
    """--out turned read-only under a run (ext4's errors=remount-ro does this): the save,
    the preflight and the lock each say so in one line; the newest checkpoint loads."""
    ckpt.save_checkpoint(small_state(1), tmpfs)
    ro = subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], capture_output=True)
    if ro.returncode != 0:
        pytest.skip(f"cannot remount read-only: {ro.stderr.decode()[:200]}")
    with pytest.raises(ckpt.SaveError) as e:
        ckpt.save_checkpoint(small_state(2), tmpfs)
    assert_one_line_save_error(e.value, tmpfs, "read-only filesystem", "checkpoint.pt")
    assert "EROFS" in str(e.value) and "--out NEW_DIR" in str(e.value)
    assert ckpt.load_checkpoint(tmpfs / "checkpoint.pt")["global_step"] == 1
    with pytest.raises(UsageError, match="read-only filesystem.*another --out"):
        ckpt.check_writable(tmpfs, 1024, keep=2)
    with pytest.raises(UsageError, match="cannot create .*run.lock: .*read-only"):
        ckpt.RunLock().acquire(tmpfs)


def test_read_only_and_forbidden_injected(tmp_path, monkeypatch):
    """EROFS and EACCES on opening the temp file (root ignores chmod, so injected)."""
    run = tmp_path / "run"
    ckpt.save_checkpoint(small_state(1), run)
    for code, cause in ((errno.EROFS, "read-only filesystem"), (errno.EACCES, "not writable")):

        def refuse(path, mode="r", *a, code=code, **k):
            raise OSError(code, os.strerror(code), str(path))

        monkeypatch.setattr(ckpt, "open", refuse, raising=False)
        with pytest.raises(ckpt.SaveError) as e:
            ckpt.save_checkpoint(small_state(2), run)
        assert_one_line_save_error(e.value, run, cause, "checkpoint.pt")
        with pytest.raises(ckpt.SaveError, match=cause):
            ckpt.save_atomic(small_state(2), tmp_path / "export.pth")
    monkeypatch.undo()
    assert ckpt.load_checkpoint(run / "checkpoint.pt")["global_step"] == 1


def test_first_save_refused_says_nothing_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "")))
    with pytest.raises(ckpt.SaveError) as e:
        ckpt.save_checkpoint(small_state(1), tmp_path)
    assert f"no complete checkpoint was in {tmp_path} yet" in str(e.value) and e.value.kept is None
    assert faults.format_bytes(1536) == "1.5 KiB" and faults.format_bytes(3 << 40) == "3.0 TiB"


def test_a_bug_in_a_save_keeps_its_traceback(tmp_path, monkeypatch):
    """Only refusals of the disk become SaveError; any other failure is raised as it is."""

    def broken(obj, f):
        raise RuntimeError("something else went wrong")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="something else") as e:
        ckpt.save_checkpoint(small_state(1), tmp_path)
    assert not isinstance(e.value, ckpt.SaveError)
    assert not list(tmp_path.glob(".*.tmp*"))


def test_preflight_refuses_an_out_without_room(tmpfs, tmp_path, monkeypatch):
    """check_writable: --keep 2 checkpoints of 0.8 MiB peak at three files (the new one is
    written before the oldest goes), 2.4 MiB, more than the 2 MiB tmpfs holds."""
    mib = 1024 * 1024
    ckpt.check_writable(tmpfs, int(0.5 * mib), keep=2)  # 1.5 MiB: fits
    with pytest.raises(UsageError) as e:
        ckpt.check_writable(tmpfs, int(0.8 * mib), keep=2)
    msg = str(e.value)
    assert "has 2.0 MiB free" in msg and "--keep 2 checkpoints of about 819.2 KiB" in msg, msg
    assert "need 2.4 MiB more" in msg and "3 files at its peak" in msg, msg
    assert "--keep 1 needs 1.6 MiB" in msg and "another --out" in msg, msg
    ckpt.check_writable(tmpfs, int(0.8 * mib), keep=1)
    assert not list(tmpfs.iterdir())  # the probe is gone
    # the chain already on disk counts as room taken: only the new file is more
    run = tmp_path / "run"
    ckpt.save_checkpoint(small_state(1), run)
    ckpt.save_checkpoint(small_state(2), run)
    size = (run / "checkpoint.pt").stat().st_size
    monkeypatch.setattr(faults, "free_bytes", lambda d: size + 1)
    ckpt.check_writable(run, size, keep=2)
    monkeypatch.setattr(faults, "free_bytes", lambda d: size - 1)
    with pytest.raises(UsageError, match="need .* more"):
        ckpt.check_writable(run, size, keep=2)


def test_checkpoint_size_estimate_holds_the_first_save(tmp_path):
    """Before the first step the optimizer has no momentum buffers yet; the estimate counts
    them, so it is not below the size of the files the run will write."""
    for make in (
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda p: torch.optim.AdamW(p, lr=1e-3),
    ):
        model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.BatchNorm1d(512))
        opt = make(model.parameters())

        def state(model=model, opt=opt):
            return {"model": model.state_dict(), "optimizer": opt.state_dict()}

        estimate = ckpt.estimate_checkpoint_bytes(state(), opt)
        model(torch.randn(4, 512)).sum().backward()
        opt.step()
        ckpt.save_checkpoint(state(), tmp_path)
        actual = (tmp_path / "checkpoint.pt").stat().st_size
        assert actual <= estimate <= 1.1 * actual + 128 * 1024, (type(opt), estimate, actual)


# --- loader workers and peers (point 4) -------------------------------------------------------
class DiesAtFive(Dataset):
    def __init__(self, how: str):
        self.how = how

    def __len__(self):
        return 64

    def __getitem__(self, i):
        if i == 5:
            if self.how == "exit":
                os._exit(3)
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.zeros(2)


@pytest.mark.parametrize(
    "how,said", [("exit", "exited with code 3"), ("kill", "killed by SIGKILL, most often")]
)
def test_dead_loader_worker_is_one_line(tmp_path, how, said):
    """The real RuntimeError of a worker that died, classified."""
    # batches of plain ints: tensors would be fetched from the worker by file descriptor,
    # and a worker dead before that fetch fails it first (the case below)
    batches = iter(DataLoader(DiesAtFive(how), batch_size=2, num_workers=1, collate_fn=len))
    try:
        with pytest.raises(RuntimeError) as e:
            for _ in batches:
                pass
    finally:  # unregisters the dead worker, or its SIGCHLD check fires in a later test
        batches._shutdown_workers()
    assert "DataLoader worker" in str(e.value)
    kept = tmp_path / "checkpoint.pt"
    fault = faults.classify(e.value, run_dir=tmp_path, kept=kept, step=12)
    assert fault is not None and fault.exit_code == 75
    assert fault.message.startswith("a data loader worker (pid ") and said in fault.message
    assert f"at step 12; the newest complete checkpoint, {kept}, is kept" in fault.message
    assert fault.message.endswith(f"continue with --resume {tmp_path}")


def test_worker_dead_before_its_batch_was_fetched():
    """The batch's tensors live in the dead worker's shared memory: the fetch fails with a
    ConnectionResetError raised inside torch's DataLoader (there, not elsewhere)."""
    code = compile(
        "raise ConnectionResetError(104, 'Connection reset by peer')",
        "/site-packages/torch/utils/data/dataloader.py",
        "exec",
    )
    with pytest.raises(ConnectionResetError) as e:
        exec(code)
    fault = faults.classify(e.value, run_dir="/r")
    assert fault.message.startswith("a data loader worker died while handing over a batch")
    assert fault.exit_code == 75
    with pytest.raises(ConnectionResetError) as e:  # a socket of ours, not the loader's
        raise ConnectionResetError(104, "Connection reset by peer")
    assert faults.classify(e.value, run_dir="/r") is None


def _rank_that_loses_its_peer(rank: int, port: int, results):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    t = torch.ones(4)
    dist.all_reduce(t)
    if rank == 1:
        os._exit(9)  # a node lost
    time.sleep(0.5)
    try:
        dist.all_reduce(t)
        results.put(None)
    except Exception as e:  # noqa: BLE001 - whatever gloo raises is what is classified
        results.put((str(e)[:300], faults.classify(e, run_dir="/runs/x")))


def test_lost_peer_is_one_line():
    """A rank dies mid-run: the real gloo error on the rank that survives, classified."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_rank_that_loses_its_peer, args=(r, port, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert not results.empty(), [p.exitcode for p in procs]
    got = results.get()
    assert got is not None, "the all_reduce after the peer's death did not fail"
    raw, fault = got
    assert fault is not None, raw
    assert fault.message.startswith("lost contact with another rank (gloo: Connection "), fault
    assert "continue with --resume /runs/x" in fault.message and fault.exit_code == 75


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection reset by peer"),
        torch.distributed.DistBackendError(
            "NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited or there was a "
            "network error, NCCL version 2.21.5"
        ),
        torch.distributed.DistBackendError("NCCL communicator was aborted on rank 3."),
    ],
    ids=["gloo-reset", "nccl-remote", "nccl-aborted"],
)
def test_peer_loss_messages_of_nccl_and_gloo(exc):
    fault = faults.classify(exc, run_dir="/r", kept="/r/checkpoint.pt")
    assert fault is not None and fault.message.startswith("lost contact with another rank")
    assert "/r/checkpoint.pt, is kept" in fault.message and fault.exit_code == 75


def test_write_failures_elsewhere_in_the_run(tmp_path):
    """A metrics or TensorBoard write the disk refuses, raised through other errors."""
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded", str(tmp_path / "metrics.jsonl"))
        except OSError as inner:
            raise RuntimeError("while logging") from inner
    except RuntimeError as e:
        fault = faults.classify(e, run_dir=tmp_path, step=40)
    assert fault.exit_code == 75 and "quota" in fault.message and "at step 40" in fault.message
    assert f"the checkpoints already in {tmp_path} are kept" in fault.message
    assert f"lower --keep) and continue with --resume {tmp_path}" in fault.message


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("a bug"),
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        BrokenPipeError(errno.EPIPE, "Broken pipe"),  # stdout piped into head
        PermissionError(errno.EACCES, "Permission denied", "/data/train/img.jpg"),  # data
        UsageError("--lr -1: must be positive"),
        NonFiniteError(3, None),
    ],
)
def test_other_errors_are_not_environment_faults(exc, tmp_path):
    assert faults.classify(exc, run_dir=tmp_path) is None


# --- --on-nonfinite skip limits (point 5) ----------------------------------------------------
def run_guard(outcomes: str, limits=None, first_step=0) -> NonFiniteGuard:
    """A skip-mode guard fed one step per character: '.' finite, 'x' NaN loss."""
    limits = limits or DropLimits()
    guard = NonFiniteGuard(torch.device("cpu"), "skip", first_step, False, limits=limits)
    for c in outcomes:
        loss = torch.tensor(float("nan") if c == "x" else 1.0)
        assert guard.drop(guard.observe(loss, [])) == (c == "x")
    return guard


def test_skip_stops_when_most_steps_are_dropped():
    """--lr 1e30: one step, then every one dropped. 9 of 10 dropped is no success."""
    guard = run_guard("." + "x" * 9)
    assert guard.breach == "dropped 9 of the last 10 steps (more than 50%)"
    assert guard.breach_step == 10 and guard.first_bad_step() + 1 == 10
    err = DroppedStepsError(guard.breach_step, None, guard.breach)
    assert isinstance(err, NonFiniteError) and err.exit_code == 3
    assert "--on-nonfinite skip dropped 9 of the last 10 steps (more than 50%) by step 10" in (
        str(err)
    )
    assert "no checkpoint was written" in str(err) and "--lr" in str(err)


def test_skip_stops_on_drops_in_a_row_and_on_a_share_of_the_window():
    guard = run_guard("." * 200 + "x" * 10)  # a run that diverged late: 10 of 100
    assert guard.breach == "dropped 10 steps in a row (the limit is 10)"
    assert guard.breach_step == 210 and guard.first_bad_step() == 209
    guard = run_guard(".xx" * 40)  # never 10 in a row, two of three dropped
    assert guard.breach == "dropped 6 of the last 10 steps (more than 50%)"
    assert guard.breach_step == 10
    # the window slides: 51 of the last 100 after a long healthy stretch
    guard = run_guard("." * 300 + ".x" * 49 + "xx" + ".x" * 3, first_step=1000)
    assert guard.breach == "dropped 51 of the last 100 steps (more than 50%)"
    assert guard.breach_step == 1000 + 300 + 98 + 2
    # after the breach the flag stays set, whatever the next steps are
    guard = run_guard("x" * 10 + "." * 5)
    assert guard.breach_step == 10 and guard.first_bad_step() == 9


def test_skip_tolerates_rare_bad_batches():
    """Isolated drops, and half of a window exactly, are what skip is for: no stop, and
    each drop leaves the flag clear."""
    guard = run_guard(("." * 19 + "x") * 50)
    assert guard.breach is None and guard.skipped == 50 and guard.first_bad_step() == -1
    guard = run_guard(".x" * 100)  # 50%: not more than half
    assert guard.breach is None and guard.skipped == 100
    guard = run_guard("x" * 9 + "." + "x" * 9, limits=DropLimits(min_steps=20, window=20))
    assert guard.breach is None  # 18 of 19 seen: not judged before 20
    stop = NonFiniteGuard(torch.device("cpu"), "stop", 0, False)
    assert not stop.drop(stop.observe(torch.tensor(float("nan")), []))
    assert stop.breach is None and stop.first_bad_step() == 0


def test_drop_limits_refuse_nonsense():
    with pytest.raises(ValueError, match="max_share"):
        DropLimits(max_share=1.0)
    with pytest.raises(ValueError, match="positive"):
        DropLimits(window=0)


# --- torn files set aside, not rotated over the good one ------------------------------------
def torn_run(tmp_path) -> Path:
    """checkpoint.prev.pt at step 1 (good), checkpoint.pt at step 2 torn in half."""
    run = tmp_path / "run"
    ckpt.save_checkpoint(small_state(1), run)
    ckpt.save_checkpoint(small_state(2), run)
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    return run


def test_the_first_save_after_a_torn_fallback_keeps_the_good_file(tmp_path, capsys):
    run = torn_run(tmp_path)
    torn = (run / "checkpoint.pt").read_bytes()
    path, state = ckpt.newest_loadable(run)
    assert path == run / "checkpoint.prev.pt" and state["global_step"] == 1
    err = capsys.readouterr().err
    assert f"set {run / 'checkpoint.pt'} aside as checkpoint.pt.unreadable-1" in err, err
    assert (run / "checkpoint.pt.unreadable-1").read_bytes() == torn  # kept for a look
    ckpt.save_checkpoint(small_state(3), run)  # the resumed run's first save
    chain = [ckpt.load_checkpoint(p)["global_step"] for p in ckpt.existing_chain(run)]
    assert chain == [3, 1]  # the file the run resumed from is still the fallback


def test_save_never_rotates_a_torn_file_over_a_good_one(tmp_path, capsys):
    """Even without newest_loadable's set-aside (resumed from elsewhere, or an older
    version's fallback), a save moves no torn file down the chain."""
    run = torn_run(tmp_path)
    ckpt.save_checkpoint(small_state(3), run)
    assert "aside as checkpoint.pt.unreadable-1" in capsys.readouterr().err
    chain = [ckpt.load_checkpoint(p)["global_step"] for p in ckpt.existing_chain(run)]
    assert chain == [3, 1]
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[:100])
    ckpt.save_checkpoint(small_state(4), run, keep=3)
    chain = [ckpt.load_checkpoint(p)["global_step"] for p in ckpt.existing_chain(run)]
    assert chain == [4, 1] and (run / "checkpoint.pt.unreadable-2").is_file()
    ckpt.clear_run_outputs(run)  # --force removes what was set aside too
    assert not list(run.iterdir())


def test_unreadable_files_stay_when_nothing_loads(tmp_path):
    run = torn_run(tmp_path)
    (run / "checkpoint.prev.pt").write_bytes(b"")
    with pytest.raises(UsageError, match="every checkpoint .* is unreadable"):
        ckpt.newest_loadable(run)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]


# --- which run --resume auto continues ---------------------------------------------------
def make_run(root: Path, name: str, data, age_s: float, config: bool = True) -> Path:
    d = root / name
    ckpt.save_checkpoint(small_state(1, n=16), d)
    if config:
        (d / "config.yaml").write_text(f"preset: test\ndata: {json.dumps(data)}\nlr: 0.1\n")
    t = time.time() - age_s
    os.utime(d / "checkpoint.pt", (t, t))
    return d


def test_resume_auto_takes_the_newest_run_on_the_same_data(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for d in ("imagenet", "cifar"):
        (tmp_path / d).mkdir()
    runs = tmp_path / "runs"
    a = make_run(runs, "test-a", str(tmp_path / "imagenet"), age_s=300)
    make_run(runs, "test-b", "cifar", age_s=200)  # relative: resolved from here
    make_run(runs, "test-c", None, age_s=100, config=False)  # no config.yaml: not chosen
    make_run(runs, "other-d", "imagenet", age_s=0)  # another preset
    assert ckpt.resolve_resume("auto", None, "runs", "test", data="imagenet/").name == a.name
    said = capsys.readouterr().out
    assert "continuing runs/test-a, the newest runs/test-* run trained on imagenet/" in said
    assert "passed over newer runs: test-c (no readable config.yaml), test-b (cifar)" in said
    b = ckpt.resolve_resume("auto", None, "runs", "test", data=str(tmp_path / "cifar"))
    assert b.name == "test-b"
    with pytest.raises(UsageError) as e:
        ckpt.resolve_resume("auto", None, "runs", "test", data="elsewhere")
    msg = str(e.value)
    assert "no runs/test-* run was trained on elsewhere" in msg, msg
    assert "runs/test-c: no readable config.yaml; runs/test-b: cifar; runs/test-a: " in msg
    assert "--resume DIR" in msg and "--out DIR" in msg and "\n" not in msg
    assert ckpt.resolve_resume("auto", None, "runs", "test").name == "test-c"  # ANY_DATA
    # the embedded demo set (no --data) is a data set too
    make_run(runs, "test-e", None, age_s=400)
    assert ckpt.resolve_resume("auto", None, "runs", "test", data=None).name == "test-e"
    # prepare_run_dir passes data= through and returns the chosen run as the run directory
    run_dir, source = ckpt.prepare_run_dir(None, "auto", "test", data="cifar")
    assert run_dir == source and source.name == "test-b"


def test_named_data_sets_compare_by_their_resolved_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c10").mkdir()
    assert ckpt.data_key("cifar10:c10") == ckpt.data_key(f"cifar10:{tmp_path}/c10/")
    assert ckpt.data_key("cifar10:c10") != ckpt.data_key("cifar100:c10")
    assert ckpt.data_key(None) is None
