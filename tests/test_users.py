"""What a user meets: config files that cannot lower a guard, a run's config.yaml as a
recipe, resume that says what it did, logs for a file, messages that name the fix."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import tiny_train_config as tiny_cfg

from fastmoco.cli import main
from fastmoco.config import PRESETS
from fastmoco.engine import train
from fastmoco.models import MoCo


class _RunsCode:
    """A pickle whose loading runs code: it creates the file `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --- config files are data -----------------------------------------------------------------


def test_a_config_file_cannot_unpickle_or_resume(tmp_path, capsys):
    """trust_checkpoint and resume in a shared file: refused naming the flag; the pickle's
    code never runs."""
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(_RunsCode(str(marker))))
    for field, value in (("trust_checkpoint", "true"), ("resume", str(evil)),
                         ("force", "true"), ("out", str(tmp_path / "x"))):  # fmt: skip
        shared = tmp_path / "shared.yaml"
        shared.write_text(
            f"epochs: 1\ntrust_checkpoint: true\nresume: {evil}\n"
            if field == "trust_checkpoint"
            else f"epochs: 1\n{field}: {value}\n"
        )
        assert main(["train", "--config", str(shared)]) == 2
        err = capsys.readouterr().err
        flag = "--" + ("trust_checkpoint" if field == "trust_checkpoint" else field).replace(
            "_", "-"
        )
        assert "can only be given on the command line" in err and flag in err, err
    assert not marker.exists()


def test_config_values_are_converted_or_refused_by_name(tmp_path, capsys):
    path = tmp_path / "c.yaml"

    def printed(text):
        path.write_text(text)
        code = main(["train", "--config", str(path), "--print-config"])
        out, err = capsys.readouterr()
        return code, (yaml.safe_load(out) if code == 0 else err)

    code, cfg = printed("lr: 1e-3\nmoco_m: '0.5'\nepochs: '3'\n")  # YAML 1.1 reads 1e-3 as str
    assert code == 0 and (cfg["lr"], cfg["moco_m"], cfg["epochs"]) == (1e-3, 0.5, 3)
    for text, words in (
        ("epochs: true\n", "epochs: True is not a whole number"),
        ("crop_scale: 0.5\n", "crop_scale: 0.5 is not a list of 2 numbers"),
        ("data: 123\n", "data: 123 is not a string"),
        ("epochs: 1.5\n", "is not a whole number"),
        ("batchsize: 32\n", "did you mean batch_size?"),
        ("lr: -1\n", "--lr -1.0: must be a finite number above 0"),  # --print-config checks
    ):
        code, err = printed(text)
        assert code == 2 and words in err, (text, err)
    path.write_bytes(b"epochs: \xff\xfe\n")
    assert main(["train", "--config", str(path)]) == 2
    assert "not UTF-8" in capsys.readouterr().err


def test_a_runs_config_is_a_recipe_for_a_new_run(tiny_data, tmp_path, capsys):
    """The run's config.yaml holds no out/resume/force: --config with it starts a new run
    (told so, with --resume DIR to continue), and the first run is untouched."""
    first = tmp_path / "a"
    train(tiny_cfg(tiny_data, first, epochs=1, force=True))
    written = yaml.safe_load((first / "config.yaml").read_text())
    assert not {"out", "resume", "force", "trust_checkpoint"} & set(written)
    before = (first / "checkpoint.pt").read_bytes()
    second = tmp_path / "b"
    argv = ["train", "--config", str(first / "config.yaml"), "--out", str(second)]
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"--resume {first}" in err
    assert (first / "checkpoint.pt").read_bytes() == before
    assert (second / "checkpoint.pt").is_file()


# --- resume --------------------------------------------------------------------------------


def test_resume_says_where_and_nothing_to_train_writes_nothing(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_cfg(tiny_data, out, epochs=1))
    config_before = (out / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--epochs", "2", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert f"resume: {out / 'checkpoint.pt'} (saved after step 4): continuing at epoch 2" in text
    config_two = (out / "config.yaml").read_text()
    assert "epochs: 2" in config_two and config_two != config_before
    stamp = (out / "checkpoint.pt").stat().st_mtime_ns
    for epochs in ("2", "1"):  # finished, and fewer than done
        assert main(["train", "--resume", str(out), "--epochs", epochs]) == 0
        text = capsys.readouterr().out
        assert "nothing to train" in text and "--epochs 3" in text and "epoch 1/" not in text
        assert (out / "config.yaml").read_text() == config_two
        assert (out / "checkpoint.pt").stat().st_mtime_ns == stamp


def test_data_is_stored_resolved_so_resume_works_from_anywhere(tiny_data, tmp_path):
    """--data given relative to one folder; --resume from another folder finds it."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    rel = os.path.relpath(tiny_data, work)
    common = ["--arch", "resnet-tiny", "--small-images", "--crop-size", "16", "--dim", "16",
              "--mlp-hidden", "32", "--queue-size", "64", "--batch-size", "8", "--workers", "0",
              "--device", "cpu", "--no-progress", "--knn-every", "0", "--bn-splits", "2",
              "--allow-repeated-negatives"]  # fmt: skip
    run = [sys.executable, "-m", "fastmoco", "train"]
    first = subprocess.run([*run, "--data", rel, "--epochs", "1", "--out", str(tmp_path / "r"),
                            *common], cwd=work, capture_output=True, text=True)  # fmt: skip
    assert first.returncode == 0, first.stderr
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["data"]
    assert saved == str(tiny_data.resolve())
    second = subprocess.run([*run, "--resume", str(tmp_path / "r"), "--epochs", "2"],
                            cwd=elsewhere, capture_output=True, text=True)  # fmt: skip
    assert second.returncode == 0, second.stderr


# --- what a run prints ---------------------------------------------------------------------


def test_a_log_file_gets_plain_lines_and_the_run_says_what_it_wrote(tiny_data, tmp_path, capsys):
    """stdout not a terminal (pytest's capture, a SLURM log): one plain line per --log-every
    steps, no tqdm frames; epochs counted from 1 in metrics.jsonl as on the console."""
    out = tmp_path / "run"
    train(tiny_cfg(tiny_data, out, progress=True, log_every=2))
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if line.startswith("step ")]
    assert len(lines) == 4 and "\r" not in text  # 8 steps, a line every 2
    assert "| epoch 1/2 2/4 | loss " in lines[0] and "img/s" in lines[0] and "| lr " in lines[0]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs if r["kind"] == "epoch"] == [1, 2]
    assert "epoch 1/2:" in text and "epoch 2/2:" in text
    written = text.split("run written to ")[1]
    for name in ("checkpoint.pt", "checkpoint.prev.pt", "config.yaml", "metrics.jsonl"):
        assert name in written


def test_knn_off_is_said_for_data_without_val(tiny_data, tmp_path, capsys):
    train(tiny_cfg(tiny_data / "train", tmp_path / "run", epochs=1))
    assert "kNN monitor off:" in capsys.readouterr().out


def test_banner_shows_what_the_method_uses(tiny_data, tmp_path, capsys):
    train(tiny_cfg(tiny_data, tmp_path / "v3", method="mocov3", epochs=1, bn_splits=1))
    banner = capsys.readouterr().out.splitlines()[0]
    assert "in-batch negatives" in banner and "K=" not in banner
    train(tiny_cfg(tiny_data, tmp_path / "v2", epochs=1))
    assert "K=64 queue" in capsys.readouterr().out


def test_skipped_images_are_named(tiny_data, tmp_path, capsys):
    bad = tiny_data / "train" / "class0" / "000.jpg"
    bad.write_bytes(bad.read_bytes()[:100])  # a truncated JPEG
    train(tiny_cfg(tiny_data, tmp_path / "run", epochs=1, skip_bad_images=True, knn_every=0))
    text = capsys.readouterr().out
    assert "reads of unreadable images: " in text and str(bad) in text


def test_version_and_bare_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "fastmoco 0." in capsys.readouterr().out
    assert main([]) == 0
    assert "COMMAND" in capsys.readouterr().out


# --- the PyTorch habits work ---------------------------------------------------------------


def test_to_moves_the_random_streams():
    """.to() (and .cpu(), .double(), ...) moves what forward needs: the shuffle-BN generator
    follows the parameters' device (checked here on 'meta', which needs no GPU)."""
    model = MoCo("resnet-tiny", dim=8, K=16, small_images=True, bn_splits=2, seed=3)
    assert model.shuffle_gen.device.type == "cpu"
    model.double()  # no device change: the same generator, its state kept
    g = model.shuffle_gen
    model.to("cpu")
    assert model.shuffle_gen is g
    if torch.cuda.is_available():
        model.cuda()
        assert model.shuffle_gen.device.type == "cuda"
        assert model.shuffle_gen.initial_seed() == 3


def test_print_config_of_a_preset_is_valid_for_every_preset(capsys):
    for name in PRESETS:
        assert main(["train", "--preset", name, "--print-config"]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["preset"] == name


def test_an_image_list_is_checked_whole_before_training(tiny_data, tmp_path, capsys):
    """A missing file at line 51 of a list: refused before the first step (nothing made),
    named; with --skip-bad-images it trains, skipping it."""
    files = sorted(str(p) for p in (tiny_data / "train").rglob("*.jpg"))
    listed = (files * 2)[:50] + [str(tmp_path / "gone.jpg")] + files[:10]
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(listed) + "\n")
    out = tmp_path / "run"
    with pytest.raises(Exception, match="1 of the 61 images .* do not exist .*gone.jpg"):
        train(tiny_cfg(lst, out, epochs=1, knn_every=0))
    assert not out.exists()
    train(tiny_cfg(lst, out, epochs=1, knn_every=0, skip_bad_images=True))
    assert "1 listed images do not exist and will be skipped" in capsys.readouterr().out
