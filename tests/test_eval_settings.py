"""knn and lincls evaluate a checkpoint with the settings it records (crop, normalisation,
stem, method, its run's kNN monitor), whichever form it comes in (checkpoint.pt, its moco
export, its torchvision export with the .fastmoco.json sidecar): they print each setting
with its source, choose the protocol from it, refuse flags that contradict it unless
--override-checkpoint-settings, and take a run directory for --pretrained."""

import json
import math
import re

import pytest
import torch
import torchvision
from conftest import tiny_train_config
from test_checkpoint_io import fastmoco_checkpoint
from torch import nn

from fastmoco.cli import main
from fastmoco.engine import train
from fastmoco.engine.checkpoint_io import (
    read_pretrained,
    settings_of,
    sidecar_path,
)
from fastmoco.errors import UsageError
from fastmoco.eval.lincls import PRESETS, LinclsConfig, lr_at, resolve_config

CPU = ["--workers", "0", "--device", "cpu"]


def _line(text: str, start: str) -> str:
    return next(x for x in text.splitlines() if x.startswith(start))


def _top1(out: str) -> float:
    return float(re.search(r"kNN top-1: ([\d.]+)%", out)[1])


def _values(line: str) -> str:
    """A settings line without its sources: what was used, not where it came from."""
    return re.sub(r" \([^()]*(\([^()]*\)[^()]*)*\)", "", line)


@pytest.fixture
def trained(tiny_data, tmp_path):
    """A 1-epoch tiny run (16-px crops, mean 0.5, std 0.25, kNN k=5) and its two exports."""
    res = train(tiny_train_config(tiny_data, tmp_path / "run", epochs=1))
    forms = {"checkpoint": tmp_path / "run" / "checkpoint.pt"}
    for fmt in ("moco", "torchvision"):
        forms[fmt] = tmp_path / f"{fmt}.pth"
        assert main(["export", "--pretrained", str(tmp_path / "run"), "--format", fmt,
                     "--out", str(forms[fmt])]) == 0  # fmt: skip
    return res, forms


def test_three_forms_give_the_same_settings_and_numbers(trained, tiny_data, tmp_path, capsys):
    """knn and lincls with no flags but --data: the same settings (sources aside) and the
    same accuracy from checkpoint.pt, its moco export and its torchvision export; kNN equals
    the training run's own monitor."""
    res, forms = trained
    capsys.readouterr()
    knn, probes = {}, {}
    for name, path in forms.items():
        assert main(["knn", "--pretrained", str(path), "--data", str(tiny_data), *CPU]) == 0
        out = capsys.readouterr().out
        knn[name] = (_values(_line(out, "settings:")), _top1(out))
        args = ["lincls", "--pretrained", str(path), "--data", str(tiny_data), *CPU]
        args += ["--epochs", "2", "--batch-size", "12", "--out", str(tmp_path / f"lc-{name}")]
        assert main([*args, "--no-progress"]) == 0
        out = capsys.readouterr().out
        lines = [_line(out, s) for s in ("protocol:", "settings:", "optimisation:")]
        ck = torch.load(tmp_path / f"lc-{name}" / "checkpoint.pt", weights_only=False)
        probes[name] = (lines, ck)
    side = _line(out, "settings:")
    assert "crop 16 (sidecar)" in side and "mean 0.5,0.5,0.5 (sidecar)" in side
    want = "settings: crop 16, resize 16, mean 0.5,0.5,0.5, std 0.25,0.25,0.25, k 5, t 0.1"
    assert knn["checkpoint"][0] == want + ", features backbone"
    assert len(set(knn.values())) == 1, knn  # same settings, same top-1
    assert knn["checkpoint"][1] == pytest.approx(res["knn_final"], abs=5e-3)
    # without its sidecar the plain state_dict records nothing: other settings, said so
    sidecar_path(forms["torchvision"]).unlink()
    args = ["knn", "--pretrained", str(forms["torchvision"]), "--data", str(tiny_data), *CPU]
    assert main(args) == 0
    bare = _line(capsys.readouterr().out, "settings:")
    assert "crop 32 (default for a small-image stem; none recorded)" in bare
    assert "k 36 (InstDisc's default 200, clamped to the bank)" in bare

    lines, ck = probes["checkpoint"]
    assert lines[0].startswith("protocol: small-images (from the checkpoint: resnet-tiny, crop 16")
    assert "crop 16 (checkpoint)" in lines[1] and "crop scale 0.5,1 (preset)" in lines[1]
    assert "epochs 2 (flag)" in lines[2] and "lr 0.3 (preset)" in lines[2]
    for name, (other_lines, other) in probes.items():
        assert [_values(x) for x in other_lines[1:]] == [_values(x) for x in lines[1:]], name
        for k in ("fc.weight", "fc.bias"):
            assert torch.equal(other["state_dict"][k], ck["state_dict"][k]), (name, k)
        assert [h["top1"] for h in other["history"]] == [h["top1"] for h in ck["history"]]


def test_sidecar_beside_a_plain_state_dict(tmp_path):
    """The torchvision export stays a state_dict that torchvision's ResNet loads; its
    settings are in FILE.fastmoco.json, the values the checkpoint records."""
    fastmoco_checkpoint(tmp_path / "ck.pt", crop_size=96, mean=(0.4, 0.5, 0.6), knn_k=7)
    assert main(["export", "--pretrained", str(tmp_path / "ck.pt"), "--format", "torchvision",
                 "--out", str(tmp_path / "r18.pth")]) == 0  # fmt: skip
    sd = torch.load(tmp_path / "r18.pth", weights_only=True)
    msg = torchvision.models.resnet18().load_state_dict(sd, strict=False)
    assert set(msg.missing_keys) == {"fc.weight", "fc.bias"} and not msg.unexpected_keys
    side = json.loads(sidecar_path(tmp_path / "r18.pth").read_text())
    assert side["fastmoco_sidecar"] == 1 and side["format"] == "torchvision"
    assert (side["arch"], side["small_images"], side["crop_size"]) == ("resnet18", False, 96)
    assert side["mean"] == [0.4, 0.5, 0.6] and side["knn_k"] == 7 and side["epoch"] == 7
    assert side["method"] == "moco" and side["source"] == str(tmp_path / "ck.pt")
    s = settings_of(read_pretrained(tmp_path / "r18.pth"))
    assert (s["crop_size"].value, s["crop_size"].source) == (96, "sidecar")
    assert s["mean"].value == (0.4, 0.5, 0.6) and s["knn_k"].value == 7
    # no temp file left by the atomic writes
    assert not list(tmp_path.glob(".*.tmp*"))


def _tamper(path, **changes):
    side = sidecar_path(path)
    values = json.loads(side.read_text())
    values.update(changes)
    side.write_text(json.dumps(values))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(crop_size="32"), "crop_size: '32' is not a whole number"),
        (dict(std=[0.2, 0.0, 0.2]), "std: (0.2, 0.0, 0.2) is not three finite numbers above 0"),
        (dict(knn_t=float("nan")), "knn_t: nan is not a finite number above 0"),
        (dict(arch="resnet50"), "says arch resnet50, but the weights"),
        (dict(small_images=True), "says small_images True, but the weights"),
        (dict(method="byol"), "method: 'byol' is not one of moco"),
        (dict(trust_checkpoint=True), "unknown field 'trust_checkpoint'"),
        (dict(fastmoco_sidecar=2), "not a fastmoco sidecar of version 1"),
        (dict(sha256="0" * 64), "the file's sha256 differs"),
    ],
)
def test_sidecar_is_checked_input(tmp_path, change, message):
    """Every field of its type and range, arch and stem the weights' own, the sha256 the
    file's: a bad or stale sidecar is refused by name, never used."""
    fastmoco_checkpoint(tmp_path / "ck.pt")
    assert main(["export", "--pretrained", str(tmp_path / "ck.pt"), "--format", "torchvision",
                 "--out", str(tmp_path / "r18.pth")]) == 0  # fmt: skip
    _tamper(tmp_path / "r18.pth", **change)
    with pytest.raises(UsageError, match=re.escape(message)):
        read_pretrained(tmp_path / "r18.pth")


def test_a_replaced_file_is_not_described_by_its_old_sidecar(tmp_path):
    fastmoco_checkpoint(tmp_path / "ck.pt", crop_size=96)
    assert main(["export", "--pretrained", str(tmp_path / "ck.pt"), "--format", "torchvision",
                 "--out", str(tmp_path / "r18.pth")]) == 0  # fmt: skip
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(UsageError, match="sha256 differs.*export it again, or delete"):
        read_pretrained(tmp_path / "r18.pth")
    sidecar_path(tmp_path / "r18.pth").unlink()  # without it: the conventions, said so
    s = settings_of(read_pretrained(tmp_path / "r18.pth"))
    assert s["crop_size"].value == 224 and not s["crop_size"].recorded
    assert "none recorded" in s["crop_size"].source


def test_sidecar_never_lowers_the_nan_guard(tmp_path):
    fastmoco_checkpoint(tmp_path / "ck.pt")
    out = tmp_path / "r18.pth"
    assert main(["export", "--pretrained", str(tmp_path / "ck.pt"), "--format", "torchvision",
                 "--out", str(out)]) == 0  # fmt: skip
    sd = torch.load(out, weights_only=True)
    sd["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(sd, out)
    from fastmoco.engine.checkpoint_io import file_sha256

    _tamper(out, sha256=file_sha256(out))  # a sidecar that matches the diverged file
    with pytest.raises(UsageError, match="NaN or inf"):
        read_pretrained(out)


def test_knn_refuses_what_train_refuses(trained, tiny_data, capsys):
    _, forms = trained
    base = ["knn", "--pretrained", str(forms["torchvision"]), "--data", str(tiny_data), *CPU]
    for flags, message in (
        (["--k", "0"], "--k 0: must be a whole number of at least 1"),
        (["--t", "0"], "--t 0.0: must be a finite number above 0"),
        (["--t", "nan"], "--t nan: must be a finite number above 0"),
        (["--batch-size", "0"], "--batch-size 0: must be a whole number of at least 1"),
        (["--k", "100000"], "--k 100000: more neighbours than the bank holds (36 images"),
        (
            ["--crop-size", "32"],
            "--crop-size 32 contradicts the checkpoint, which was trained "
            "with 16 (sidecar); drop --crop-size",
        ),  # fmt: skip
    ):
        assert main([*base, *flags]) == 2, flags
        assert message in capsys.readouterr().err, flags
    assert main([*base, "--crop-size", "32", "--override-checkpoint-settings"]) == 0
    out = capsys.readouterr().out
    assert "crop 32 (flag, --override-checkpoint-settings)" in out


def test_knn_clamps_a_default_k_to_the_bank_and_says_so(tiny_data, tmp_path, capsys):
    """A file that records no monitor: InstDisc's k=200 on a bank of 36, clamped with a
    note, the same number as --k 36."""
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    base = ["knn", "--pretrained", str(tmp_path / "r18.pth"), "--data", str(tiny_data), *CPU]
    assert main([*base, "--crop-size", "32"]) == 0  # nothing recorded: any crop is fine
    out = capsys.readouterr().out
    assert "k 36 (InstDisc's default 200, clamped to the bank)" in out
    assert "crop 32 (flag)" in out and "mean 0.485,0.456,0.406 (default: ImageNet's" in out
    top1 = _top1(out)
    assert main([*base, "--crop-size", "32", "--k", "36"]) == 0
    assert _top1(capsys.readouterr().out) == top1


def _cfg(path, **kw) -> LinclsConfig:
    return LinclsConfig(pretrained=str(path), data="d").replace(**kw)


def test_protocol_is_chosen_from_the_checkpoint(tmp_path, monkeypatch):
    """small-image model -> small-images, method mocov3 -> moco-v3's recipe (ViT: lr 3),
    else the official; the preset's crop only where the file records none."""
    from test_mocov3_checkpoints import SMALL, fastmoco_v3_checkpoint

    from fastmoco.models import vit

    cases = {}
    fastmoco_checkpoint(tmp_path / "small.pt", arch="resnet18", small_images=True, crop_size=48)
    cases["small.pt"] = ("small-images", 48)
    fastmoco_checkpoint(tmp_path / "r18.pt")  # method moco, 224 px
    cases["r18.pt"] = ("official", 224)
    fastmoco_v3_checkpoint(tmp_path / "v3.pt", "resnet18", 224)  # small-image stem there
    cases["v3.pt"] = ("small-images", 224)  # the stem decides before the method
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")  # no record
    cases["r34.pth"] = ("official", 224)
    small_r18 = torchvision.models.resnet18()
    small_r18.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    torch.save(small_r18.state_dict(), tmp_path / "cifar.pth")  # a 3x3 stem, nothing else
    cases["cifar.pth"] = ("small-images", 32)
    for name, (protocol, crop) in cases.items():
        p = read_pretrained(tmp_path / name)
        cfg, lines = resolve_config(_cfg(tmp_path / name), p, explicit={"pretrained", "data"})
        assert (cfg.preset, cfg.crop_size) == (protocol, crop), (name, lines)
        assert lines[0].startswith(f"protocol: {protocol} (from the checkpoint: "), lines[0]

    # moco-v3's main_lincls.py: 90 epochs, batch 1024, lr 0.1 x batch/256 on a cosine
    monkeypatch.setitem(vit.VIT_SIZES, "vit_small", SMALL)
    fastmoco_checkpoint(tmp_path / "v3r.pt", method="mocov3")  # a 224-px ResNet of mocov3
    cfg, lines = resolve_config(
        _cfg(tmp_path / "v3r.pt"), read_pretrained(tmp_path / "v3r.pt"), {"pretrained", "data"}
    )
    assert (cfg.preset, cfg.epochs, cfg.batch_size, cfg.lr) == ("mocov3", 90, 1024, 0.1)
    assert (cfg.lr_scaling, cfg.schedule, cfg.weight_decay) == ("linear", "cosine", 0.0)
    assert "lr 0.1 (preset), lr scaling linear (preset): x batch/256 = 0.4" in lines[2]
    assert lr_at(cfg, 0) == pytest.approx(0.4)
    for e in (1, 45, 89):
        assert lr_at(cfg, e) == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * e / 90)))
    fastmoco_v3_checkpoint(tmp_path / "vit.pt", "vit_small", 224)
    p = read_pretrained(tmp_path / "vit.pt")
    cfg, _ = resolve_config(_cfg(tmp_path / "vit.pt"), p, {"pretrained", "data"})
    assert (cfg.preset, cfg.lr, cfg.crop_size) == ("mocov3-vit", 3.0, 224)
    assert PRESETS["official"].lr == 30 and PRESETS["official"].lr_steps == (60, 80)


def test_contradicting_preset_and_flags_are_refused_unless_overridden(tmp_path):
    fastmoco_checkpoint(tmp_path / "small.pt", arch="resnet-tiny", crop_size=32)
    p = read_pretrained(tmp_path / "small.pt")
    given = {"pretrained", "data", "preset"}
    official = _cfg(tmp_path / "small.pt", preset="official")
    with pytest.raises(UsageError, match="--preset official contradicts the checkpoint, whose "
                       "protocol is small-images .*--override-checkpoint-settings"):  # fmt: skip
        resolve_config(official, p, given)
    cfg, lines = resolve_config(official.replace(override_checkpoint_settings=True), p, given)
    assert cfg.lr == 30 and cfg.crop_size == 32  # the protocol's lr, the checkpoint's crop
    assert "the checkpoint's would be small-images" in lines[0]
    resolve_config(_cfg(tmp_path / "small.pt", preset="demo"), p, given)  # the same protocol
    for flag, value in (("crop_size", 224), ("mean", (0.5, 0.5, 0.5))):
        with pytest.raises(UsageError, match=f"--{flag.replace('_', '-')} .* contradicts"):
            resolve_config(_cfg(tmp_path / "small.pt", **{flag: value}), p, {flag, "pretrained"})
    # a file that records nothing: any preset and crop, said where they came from
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    p = read_pretrained(tmp_path / "r18.pth")
    cfg, lines = resolve_config(
        _cfg(tmp_path / "r18.pth", preset="small-images", crop_size=64), p, given | {"crop_size"}
    )
    assert (cfg.preset, cfg.crop_size, cfg.lr) == ("small-images", 64, 0.3)
    assert "crop 64 (flag)" in lines[1] and "mean 0.485,0.456,0.406 (default" in lines[1]


def test_vit_input_size_cannot_be_overridden(tmp_path, monkeypatch):
    from test_mocov3_checkpoints import SMALL, fastmoco_v3_checkpoint

    from fastmoco.models import vit

    monkeypatch.setitem(vit.VIT_SIZES, "vit_small", SMALL)
    fastmoco_v3_checkpoint(tmp_path / "vit.pt", "vit_small", 32)
    p = read_pretrained(tmp_path / "vit.pt")
    cfg = _cfg(tmp_path / "vit.pt", crop_size=64, override_checkpoint_settings=True)
    with pytest.raises(UsageError, match="--crop-size 64: the checkpoint's network takes 32 "
                       "only .position embedding.; drop --crop-size"):  # fmt: skip
        resolve_config(cfg, p, {"crop_size", "pretrained"})


def test_pretrained_takes_a_run_directory(tiny_data, tmp_path, capsys):
    """Its newest checkpoint that loads; a torn checkpoint.pt is skipped (named), never
    renamed, since a run may own the directory; export never writes over one of them."""
    run = tmp_path / "run"
    train(tiny_train_config(tiny_data, run, epochs=2, knn_every=0, keep=2))
    capsys.readouterr()
    base = ["knn", "--pretrained", str(run), "--data", str(tiny_data), *CPU]
    assert main(base) == 0
    out = capsys.readouterr().out
    assert f"--pretrained {run}: its newest loadable checkpoint" in out
    assert f"{run / 'checkpoint.pt'}: fastmoco layout, resnet-tiny, epoch 2" in out
    torn = (run / "checkpoint.pt").read_bytes()[:1000]
    (run / "checkpoint.pt").write_bytes(torn)
    assert main(base) == 0
    captured = capsys.readouterr()
    assert "skipping" in captured.err and "checkpoint.prev.pt: fastmoco layout" in captured.out
    assert (run / "checkpoint.pt").read_bytes() == torn  # left where it was
    code = main(["export", "--pretrained", str(run), "--format", "moco",
                 "--out", str(run / "checkpoint.prev.pt"), "--force"])  # fmt: skip
    assert code == 2 and "is the --pretrained file itself" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["knn", "--pretrained", str(empty), "--data", str(tiny_data), *CPU]) == 2
    assert "a directory with no checkpoint.pt" in capsys.readouterr().err


def test_lincls_resume_auto_finds_its_run_by_data(tiny_data, tmp_path, monkeypatch, capsys):
    """lincls writes config.yaml, which --resume auto (no --out) matches runs by."""
    monkeypatch.chdir(tmp_path)
    fastmoco_checkpoint(tmp_path / "pre.pt", arch="resnet-tiny", crop_size=16)
    base = ["lincls", "--pretrained", str(tmp_path / "pre.pt"), "--data", str(tiny_data), *CPU]
    base += ["--batch-size", "12", "--no-progress"]
    assert main([*base, "--epochs", "1"]) == 0
    (run,) = (tmp_path / "runs").glob("lincls-small-images-*")
    assert (run / "config.yaml").is_file()
    capsys.readouterr()
    assert main([*base, "--epochs", "2", "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert f"continuing {run.relative_to(tmp_path)}" in out and "epoch 2/2" in out
    ck = torch.load(run / "checkpoint.pt", weights_only=False)
    assert len(ck["history"]) == 2
