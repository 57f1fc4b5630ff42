"""End-to-end training on a tiny ImageFolder: outputs, exact resume, errors of the CLI."""

import json
import math
import os
import signal

import pytest
import torch
from conftest import tiny_train_config as tiny_cfg
from conftest import write_image_folder

from fastmoco.cli import main
from fastmoco.config import TrainConfig
from fastmoco.engine import Interrupted, lr_at, train


def test_lr_schedule():
    """moco-v3's per-step rule: base * e / warmup at the step's fractional epoch e (0 at the
    first step), then the half cosine; v1's steps at whole epochs."""
    cfg = TrainConfig(lr=0.03, batch_size=512, epochs=10, warmup_epochs=2, lr_update="step")
    assert lr_at(cfg, 0, 100) == 0.0
    assert lr_at(cfg, 1, 100) == pytest.approx(0.06 * 0.01 / 2)
    assert lr_at(cfg, 199, 100) == pytest.approx(0.06 * 1.99 / 2)
    assert lr_at(cfg, 200, 100) == pytest.approx(0.06)
    assert lr_at(cfg, 600, 100) == pytest.approx(0.06 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    step = cfg.replace(schedule="step", warmup_epochs=0, lr_steps=(3, 6), lr_update="epoch")
    assert [lr_at(step, e * 100, 100) for e in (0, 3, 6)] == pytest.approx([0.06, 0.006, 0.0006])
    assert lr_at(step, 299, 100) == pytest.approx(0.06)  # the epoch's lr until its end


def test_train_writes_run(tiny_data, tmp_path):
    out = tmp_path / "run"
    res = train(tiny_cfg(tiny_data, out))
    assert res["knn_random"] is not None and res["knn_final"] is not None
    assert len(res["history"]) == 2
    for name in ("checkpoint.pt", "metrics.jsonl", "curves.png"):
        assert (out / name).is_file(), name
    assert any((out / "tb").iterdir())
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in recs} == {"step", "epoch"}
    assert all(math.isfinite(r["loss"]) for r in recs)
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ck["epoch"] == 2 and ck["global_step"] == 2 * 4
    # 8 steps x 8 keys into K=64: the pointer went round once and is back at 0
    assert int(ck["queue_ptr"]) == 0
    # the recipe: out, resume, force and trust_checkpoint come from the command line only
    assert ck["config"] == tiny_cfg(tiny_data, out).recipe_dict()


def test_train_amp_channels_last_and_knn_command(tiny_data, tmp_path, capsys):
    """bf16 autocast + channels_last on the CPU; the key encoder stays fp32, the queue takes
    the AMP dtype (--queue-dtype auto); `fastmoco knn`."""
    out = tmp_path / "run"
    res = train(tiny_cfg(tiny_data, out, epochs=1, amp=True, channels_last=True))
    assert all(math.isfinite(h["loss"]) for h in res["history"])
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert all(t.dtype == torch.float32 for t in ck["encoder_k"].values() if t.is_floating_point())
    assert ck["queue"].dtype == torch.bfloat16
    code = main(
        [
            "knn",
            "--data",
            str(tiny_data),
            "--pretrained",
            str(out / "checkpoint.pt"),
            "--workers",
            "0",
            "--device",
            "cpu",
        ]
    )
    text = capsys.readouterr().out
    assert code == 0 and "kNN top-1:" in text
    assert "k=5, t=0.1" in text  # the run's monitor settings, not InstDisc's k=200
    # the run's first lines say which step runs and why, and the precision
    assert "step: eager (CUDA graphs need a CUDA device (this run is on cpu))" in text
    assert "precision: AMP bf16 autocast, channels_last on (given), queue bfloat16" in text
    top1 = float(text.split("kNN top-1:")[1].split("%")[0])
    assert top1 == pytest.approx(res["knn_final"], abs=1e-6)
    code = main(["knn", "--data", str(tiny_data), "--pretrained", str(tiny_data)])
    assert code == 2 and "checkpoint" in capsys.readouterr().err


def _assert_same_state(a: dict, b: dict, path="") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_state(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path} differs"
    else:
        assert a == b, path


def test_resume_is_exact(tiny_data, tmp_path):
    """Interrupted mid-epoch by SIGTERM, then resumed: bit-identical to an unbroken run."""
    full = tmp_path / "full"
    train(tiny_cfg(tiny_data, full, epochs=3))

    broken = tmp_path / "broken"

    def kill_at_step_6(step):
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted) as info:
        train(tiny_cfg(tiny_data, broken, epochs=3), on_step=kill_at_step_6)
    assert info.value.signum == signal.SIGTERM
    mid = torch.load(broken / "checkpoint.pt", weights_only=False)
    assert (mid["epoch"], mid["step_in_epoch"], mid["global_step"]) == (1, 2, 6)

    train(tiny_cfg(tiny_data, broken, epochs=3, resume="auto"))
    a = torch.load(full / "checkpoint.pt", weights_only=False)
    b = torch.load(broken / "checkpoint.pt", weights_only=False)
    for key in ("encoder_q", "encoder_k", "queue", "queue_ptr", "optimizer", "global_step"):
        _assert_same_state(a[key], b[key], key)
    _assert_same_state(a["rng"]["generators"], b["rng"]["generators"], "shuffle generator")


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main(["train", *map(str, args)])
    return code, capsys.readouterr().err


@pytest.fixture
def cli_args(tmp_path):
    return [
        "--allow-repeated-negatives",  # K=64 over 16 images
        "--arch",
        "resnet-tiny",
        "--small-images",
        "--crop-size",
        "16",
        "--workers",
        "0",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--queue-size",
        "64",
        "--out",
        tmp_path / "o",
        "--no-progress",
        "--device",
        "cpu",
        "--bn-splits",
        "2",
    ]


def test_cli_missing_and_empty_data(tmp_path, capsys, cli_args):
    code, err = run_cli(capsys, "--data", tmp_path / "nope", *cli_args)
    assert code == 2 and "does not exist" in err and "nope" in err
    (tmp_path / "empty").mkdir()
    code, err = run_cli(capsys, "--data", tmp_path / "empty", *cli_args)
    assert code == 2 and "empty" in err
    write_image_folder(tmp_path / "d", classes=2, per_class=4)
    (tmp_path / "d" / "hollow").mkdir()
    code, err = run_cli(capsys, "--data", tmp_path / "d", *cli_args)
    assert code == 2 and "hollow" in err and "no images" in err


def test_cli_corrupt_image(tmp_path, capsys, cli_args):
    write_image_folder(tmp_path / "d", classes=2, per_class=8)
    bad = tmp_path / "d" / "class1" / "000.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is no jpeg")
    code, err = run_cli(capsys, "--data", tmp_path / "d", *cli_args)
    assert code == 2 and "000.jpg" in err and "--skip-bad-images" in err
    code, err = run_cli(capsys, "--data", tmp_path / "d", *cli_args, "--skip-bad-images")
    assert code == 0, err


def test_cli_batch_and_queue_and_gpus(tiny_data, capsys, cli_args):
    args = [a for a in cli_args]
    i = args.index("--batch-size")
    big = args[:i] + ["--batch-size", "64"] + args[i + 2 :]
    code, err = run_cli(capsys, "--data", tiny_data, *big)
    assert code == 2 and "queue" in err  # 64 is not larger than K=64
    code, err = run_cli(capsys, "--data", tiny_data, *big, "--queue-size", "256")
    assert code == 2 and "larger than the dataset" in err and "36 images" in err
    code, err = run_cli(capsys, "--data", tiny_data, *cli_args[:-4], "--gpus", "64")
    assert code == 2 and "--gpus 64" in err and "visible" in err


def test_cli_help_is_the_manual(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--preset",
        "--data",
        "--arch",
        "--epochs",
        "--batch-size",
        "--lr",
        "--queue-size",
        "--moco-m",
        "--temperature",
        "--gpus",
        "--amp",
        "--out",
        "--resume",
        "--seed",
        "--workers",
        "--skip-bad-images",
        "--knn-every",
    ):
        assert flag in text, flag
