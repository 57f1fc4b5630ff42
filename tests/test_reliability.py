"""Faults injected into tiny runs: torn and malicious checkpoints, kill -9 during a save,
NaN and absurd learning rates, signals to the process group, two runs on one directory,
bad numbers. docs/reliability.md lists each fault with the test that injects it."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_train_config as tiny_cfg
from conftest import write_image_folder

from fastmoco.cli import main
from fastmoco.config import TrainConfig
from fastmoco.engine import checkpoint as ckpt
from fastmoco.engine import train
from fastmoco.engine.distributed import launch
from fastmoco.engine.guard import NonFiniteError, all_finite
from fastmoco.engine.trainer import Trainer
from fastmoco.errors import UsageError
from fastmoco.models import MoCo

FAST = dict(epochs=1, knn_every=0)  # 4 steps of batch 8 on tiny_data, no kNN


def cli_args(data, *extra) -> list[str]:
    """`fastmoco train` flags of a tiny run (4 steps an epoch on tiny_data)."""
    flags = "--arch resnet-tiny --small-images --dim 16 --mlp-hidden 32 --queue-size 64 "
    flags += "--moco-m 0.9 --bn-splits 2 --crop-size 16 --workers 0 --batch-size 8 "
    flags += "--knn-every 0 --no-progress --device cpu --allow-repeated-negatives --log-every 2"
    return ["--data", str(data), *flags.split(), *map(str, extra)]


def subprocess_env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    return env


def wait_for(predicate, timeout=240.0, proc=None):
    t0 = time.monotonic()
    while not predicate():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended early ({proc.returncode}): {err[-2000:]}")
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.02)


def logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum('"kind": "step"' in line for line in path.read_text().splitlines())


def last_logged_step(out: Path) -> int:
    path, last = out / "metrics.jsonl", 0
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                last = max(last, json.loads(line)["step"])
            except ValueError:  # a line being written
                pass
    return last


def same_state(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same_state(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path} differs"
    else:
        assert a == b, path


MODEL_KEYS = ("encoder_q", "encoder_k", "queue", "queue_ptr", "optimizer", "global_step", "rng")


# --- torn, corrupt, missing checkpoints (point 5) ----------------------------------------
def test_torn_checkpoint_falls_back_to_previous(tiny_data, tmp_path, capsys):
    """Truncated at random byte counts, zero bytes, garbage, deleted: --resume finds the
    previous good checkpoint, says which file it skipped and why, and continues."""
    out = tmp_path / "run"
    train(tiny_cfg(tiny_data, out, save_every=1, **FAST))  # keeps steps 4 (newest) and 3
    newest, prev = out / "checkpoint.pt", out / "checkpoint.prev.pt"
    good = newest.read_bytes()
    assert torch.load(newest, weights_only=True)["global_step"] == 4  # our files: weights only
    rng = random.Random(0)
    damages = [good[: rng.randrange(len(good))] for _ in range(4)] + [b""]
    damages.append(bytes(rng.randrange(256) for _ in range(4096)))
    for damaged in damages:
        newest.write_bytes(damaged)
        path, state = ckpt.newest_loadable(out, set_aside_unreadable=False)
        assert path == prev and state["global_step"] == 3, len(damaged)
        assert f"skipping {newest}" in capsys.readouterr().err
    newest.unlink()
    assert ckpt.newest_loadable(out)[0] == prev
    # the run continues from step 3 to the end (epochs 2: step 8)
    res = train(tiny_cfg(tiny_data, out, save_every=1, resume="auto", epochs=2, knn_every=0))
    assert torch.load(newest, weights_only=True)["global_step"] == 8
    assert len(res["history"]) == 2
    # every file torn: a clear refusal, never a silent start from scratch
    for p in ckpt.existing_chain(out):
        p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(UsageError, match="every checkpoint .* is unreadable"):
        train(tiny_cfg(tiny_data, out, resume="auto", **FAST))


def test_metrics_are_not_repeated_after_resume(tiny_data, tmp_path):
    """Records written after the resumed checkpoint (lost steps) are dropped, not doubled."""
    out = tmp_path / "run"
    train(tiny_cfg(tiny_data, out, save_every=2, log_every=1, **FAST))
    (out / "checkpoint.pt").unlink()  # back to step 2: steps 3-4 are redone
    train(tiny_cfg(tiny_data, out, save_every=2, log_every=1, resume="auto", **FAST))
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if r["kind"] == "step"]
    assert steps == [1, 2, 3, 4]
    assert [r["step"] for r in recs if r["kind"] == "epoch"] == [4]


# --- foreign checkpoints (point 3) --------------------------------------------------------
class _CreatesAFile:
    """Unpickling this calls open(path, 'w'): the arbitrary code a foreign file can run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_checkpoint_is_refused(tiny_data, tmp_path, capsys):
    victim = tmp_path / "created_by_unpickling"
    evil = tmp_path / "evil.pt"
    torch.save({"encoder_q": {}, "payload": _CreatesAFile(victim)}, evil)
    with pytest.raises(UsageError, match="--trust-checkpoint") as e:
        ckpt.load_checkpoint(evil)
    assert "open" in str(e.value)
    cfg = tiny_cfg(tiny_data, tmp_path / "run", resume=str(evil), **FAST)
    with pytest.raises(UsageError, match="--trust-checkpoint"):
        train(cfg)
    code = main(["knn", "--data", str(tiny_data), "--pretrained", str(evil), "--device", "cpu"])
    assert code == 2 and "--trust-checkpoint" in capsys.readouterr().err
    assert not victim.exists()
    ckpt.load_checkpoint(evil, trust=True)  # the explicit opt-in does unpickle it
    assert victim.exists()


# --- kill -9 during a save (point 6) ------------------------------------------------------
def test_kill9_during_save_resumes_bit_exact(tiny_data, tmp_path):
    """SIGKILL lands inside a save (the test hook stretches the write and the renames),
    twice; each time --resume auto finds a complete checkpoint, and the finished run equals
    an uninterrupted one bit for bit."""
    args = cli_args(tiny_data, "--epochs", 2, "--save-every", 1)
    out = tmp_path / "killed"
    env = subprocess_env(**{ckpt.SAVE_DELAY_ENV: "0.4"})
    rng = random.Random(1)
    before = 0  # the step of the newest complete checkpoint
    for attempt in range(2):
        cmd = [sys.executable, "-m", "fastmoco", "train", *args, "--out", str(out)]
        cmd += ["--resume", "auto"] if attempt else []
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # step before+2 logged: the save of step before+1 is complete, the next one begins
        wait_for(lambda b=before: last_logged_step(out) >= b + 2, proc=proc)
        wait_for(lambda: list(out.glob(".checkpoint.pt.tmp*")), proc=proc)
        time.sleep(rng.uniform(0.0, 0.8))  # within the stretched write and renames
        proc.kill()
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        _, state = ckpt.newest_loadable(out)  # always a complete one, and progress made
        assert state["global_step"] > before
        before = state["global_step"]
    assert main(["train", *args, "--out", str(out), "--resume", "auto"]) == 0
    assert main(["train", *args, "--out", str(tmp_path / "whole")]) == 0
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(out / "checkpoint.pt", weights_only=True)
    for key in MODEL_KEYS:
        same_state(a[key], b[key], key)
    assert not list(out.glob(".*.tmp*"))  # the killed saves' temp files were removed


# --- NaN / inf (point 7) ------------------------------------------------------------------
@pytest.fixture
def nan_at_step_6(monkeypatch):
    """The 6th batch of the run is all NaN (the fault a corrupt decode could produce)."""
    step = Trainer.step

    def poisoned(self, im_q, im_k, index=None):
        if self.global_step == 5:
            im_q = torch.full_like(im_q, float("nan"))
        return step(self, im_q, im_k, index)

    monkeypatch.setattr(Trainer, "step", poisoned)


def test_nan_batch_stops_with_exit_3_and_keeps_last_good(tiny_data, tmp_path, nan_at_step_6):
    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_data, out, epochs=2, knn_every=0, save_every=2, log_every=4)
    with pytest.raises(NonFiniteError) as e:
        train(cfg)
    assert e.value.step == 6 and e.value.exit_code == 3
    assert "step 6" in str(e.value) and "--lr" in str(e.value)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["global_step"] == 4 and all_finite(state) is None  # the last good one
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["step"] == 4  # the run stopped at the save due at step 6, unlogged


def test_nan_batch_skipped_on_request(tiny_data, tmp_path, nan_at_step_6):
    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_data, out, epochs=2, knn_every=0, on_nonfinite="skip", log_every=1)
    res = train(cfg)
    assert res["skipped_steps"] == 1
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["global_step"] == 8 and all_finite(state) is None
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    dropped = [r for r in recs if r["kind"] == "step" and r["step"] == 6]
    assert dropped[0]["loss"] is None and dropped[0]["skipped_steps"] == 1
    assert all(r["loss"] is not None for r in recs if r not in dropped)  # in no mean


def test_absurd_lr_exits_3_with_valid_json(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", *cli_args(tiny_data, "--epochs", 1, "--lr", 1e30, "--out", out)])
    err = capsys.readouterr().err
    assert code == 3 and "non-finite" in err and "--lr" in err, err
    assert not (out / "checkpoint.pt").exists()  # nothing non-finite was written
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["loss"] is None and recs[-1]["nonfinite"] == ["loss"]  # not a bare NaN


# --- signals and concurrent runs (points 8, 9, 11) -----------------------------------------
def test_sigterm_to_process_group_with_workers_saves(tiny_data, tmp_path, capsys):
    """SIGTERM to the whole group (loader workers included) saves and exits 143; a second
    run on the same directory meanwhile is refused, naming the first one's pid."""
    out = tmp_path / "run"
    args = cli_args(tiny_data, "--epochs", 50, "--out", out)  # stopped long before the end
    args[args.index("--workers") + 1] = "2"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastmoco", "train", *args],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a job under a scheduler
    )
    try:
        wait_for(lambda: logged_steps(out) >= 1, proc=proc)
        assert main(["train", *args, "--resume", "auto"]) == 2
        err = capsys.readouterr().err
        assert "in use by another run" in err and f"pid {proc.pid}" in err
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert f"--resume {out}" in err
    state = ckpt.load_checkpoint(out / "checkpoint.pt")
    assert state["global_step"] >= 2
    assert not (out / ckpt.LOCK_NAME).exists()


def test_lock_of_a_dead_run_is_taken_over(tmp_path):
    lock = ckpt.RunLock()
    lock.acquire(tmp_path)
    with pytest.raises(UsageError, match=f"pid {os.getpid()}"):
        ckpt.RunLock().acquire(tmp_path)
    lock.release()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], stdout=-1)
    lock_file = tmp_path / ckpt.LOCK_NAME
    lock_file.write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead.stdout)}))
    taken = ckpt.RunLock()
    taken.acquire(tmp_path)  # its owner is gone: taken over
    lock_file.write_text(json.dumps({"host": "elsewhere", "pid": 1}))  # held, named so
    with pytest.raises(UsageError, match="host elsewhere"):
        ckpt.RunLock().acquire(tmp_path)
    taken.release()


# --- outputs not overwritten (point 12) -----------------------------------------------------
def test_new_run_refuses_an_existing_run(tiny_data, tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(tiny_data, out, **FAST))
    stale = out / ".checkpoint.pt.tmp999999"
    stale.write_bytes(b"half a checkpoint")
    with pytest.raises(UsageError, match="already holds a run.*--resume.*--force"):
        train(tiny_cfg(tiny_data, out, **FAST))
    train(tiny_cfg(tiny_data, out, force=True, **FAST))
    recs = (out / "metrics.jsonl").read_text().splitlines()
    assert sum('"kind": "epoch"' in r for r in recs) == 1  # the old run's records are gone
    assert not stale.exists()


# --- resume takes the checkpoint's config (point 13) ----------------------------------------
def test_resume_uses_the_checkpoint_config(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_cfg(tiny_data, out, **FAST))
    # only --resume (and an epoch count): the rest, model included, is the checkpoint's
    assert main(["train", "--resume", str(out), "--epochs", "2", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "--epochs 1 -> 2" in text
    assert torch.load(out / "checkpoint.pt", weights_only=True)["global_step"] == 8
    for flag, value in (("--queue-size", 128), ("--arch", "resnet18"), ("--dim", 32)):
        code = main(["train", "--resume", str(out), flag, str(value), "--epochs", "3"])
        err = capsys.readouterr().err
        assert code == 2 and flag in err and len(err.strip().splitlines()) == 1, err


# --- small data (point 10), bad numbers (point 15) ------------------------------------------
def test_queue_against_training_set_size(capsys):
    cfg = TrainConfig(queue_size=4096)
    with pytest.raises(UsageError, match="4096 is at least the 4000 training images"):
        MoCo.check_data(cfg, 4000)
    MoCo.check_data(cfg.replace(allow_repeated_negatives=True), 4000)
    MoCo.check_data(cfg, 10000)
    assert "41% of the 10000" in capsys.readouterr().out
    MoCo.check_data(cfg, 50000)  # 8%, the official CIFAR demo's share: silent
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--lr", "-0.5"),
        ("--lr", "nan"),
        ("--temperature", "nan"),
        ("--crop-size", "0"),
        ("--workers", "-2"),  # -1 is valid: chosen from the cores
        ("--dim", "0"),
        ("--knn-k", "0"),
        ("--save-every", "-1"),
        ("--moco-m", "1.5"),
    ],
)
def test_bad_numbers_are_one_line_errors(tmp_path, capsys, flag, value):
    code = main(["train", "--data", str(tmp_path / "nope"), flag, value, "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and f"{flag} {value}" in err and len(err.strip().splitlines()) == 1, err


# --- errors on spawned ranks (point 2) ------------------------------------------------------
def raise_on_rank_1():
    if int(os.environ["RANK"]) == 1:
        raise UsageError("rank 1 found a bad image: fix it")
    torch.distributed.barrier()  # rank 0 waits for rank 1, as in a collective of the step


def test_usage_error_on_a_spawned_rank_is_one_error():
    with pytest.raises(UsageError, match="rank 1 found a bad image: fix it"):
        launch(raise_on_rank_1, (), nprocs=2, device="cpu")


# --- skip-bad-images reaches the kNN monitor (point 14) -------------------------------------
def test_skip_bad_images_reaches_knn(tmp_path):
    data = tmp_path / "data"
    write_image_folder(data / "train", per_class=12)
    write_image_folder(data / "val", per_class=4, seed=1)
    (data / "train" / "class1" / "003.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    res = train(tiny_cfg(data, tmp_path / "run", epochs=1, skip_bad_images=True))
    assert res["knn_random"] is not None and res["knn_final"] is not None


# --- outputs of export, non-finite weights, split classes (points 12, 16) --------------------
@pytest.fixture
def resnet18_file(tmp_path) -> Path:
    """A torchvision ResNet-18 state_dict at random init (a layout checkpoint_io reads)."""
    import torchvision

    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def test_export_never_overwrites_silently(resnet18_file, tmp_path, capsys):
    export = ["export", "--pretrained", str(resnet18_file), "--format", "torchvision"]
    before = resnet18_file.read_bytes()
    assert main([*export, "--out", str(resnet18_file)]) == 2
    assert "is the --pretrained file itself" in capsys.readouterr().err
    assert resnet18_file.read_bytes() == before
    assert main([*export, "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*.tmp*"))  # no temp file left by the refusal
    out = tmp_path / "out.pth"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], stdout=-1)
    stale = tmp_path / f".out.pth.tmp{int(dead.stdout)}"  # a killed export's leftover
    stale.write_bytes(b"partial")
    assert main([*export, "--out", str(out)]) == 0 and not stale.exists()
    assert main([*export, "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main([*export, "--out", str(out), "--force"]) == 0


def test_nan_weights_are_not_evaluated(resnet18_file, tiny_data, tmp_path, capsys):
    """knn, lincls and export refuse a diverged run's NaN weights instead of reporting
    chance accuracy or "changed the frozen backbone"."""
    sd = torch.load(resnet18_file, weights_only=True)
    sd["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    bad = tmp_path / "nan.pth"
    torch.save(sd, bad)
    for argv in (
        ["knn", "--data", str(tiny_data), "--pretrained", str(bad), "--device", "cpu"],
        ["lincls", "--data", str(tiny_data), "--pretrained", str(bad), "--device", "cpu"],
        ["export", "--pretrained", str(bad), "--format", "moco", "--out", str(tmp_path / "x")],
    ):
        assert main(argv) == 2, argv[0]
        err = capsys.readouterr().err
        assert "layer2.0.conv1.weight" in err and "NaN or inf" in err, err


def test_knn_refuses_val_classes_unlike_train(resnet18_file, tmp_path, capsys):
    write_image_folder(tmp_path / "d" / "train", classes=3, per_class=2)
    write_image_folder(tmp_path / "d" / "val", classes=2, per_class=2)
    argv = ["knn", "--data", str(tmp_path / "d"), "--pretrained", str(resnet18_file)]
    assert main([*argv, "--device", "cpu", "--workers", "0"]) == 2
    assert "different classes (3 vs 2)" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_fp16_queue_clamps_keys_beyond_its_range(backend):
    """An fp32 key above fp16's range is written as fp16's largest value, not inf."""
    from fastmoco.ops.enqueue import enqueue_, extension_op

    if backend == "cuda" and extension_op() is None:
        pytest.skip("the C++ extension is not built")
    queue = torch.zeros(4, 3, dtype=torch.float16)
    ptr = torch.zeros(1, dtype=torch.int64)
    keys = torch.tensor([[1e6, -1e6, 0.5], [70000.0, 1.0, -2.0]])
    enqueue_(queue, ptr, keys, backend=backend)
    top = torch.finfo(torch.float16).max
    want = torch.tensor([[top, -top, 0.5], [top, 1.0, -2.0]], dtype=torch.float16)
    assert torch.equal(queue[:2], want) and int(ptr) == 2
