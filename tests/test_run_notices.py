"""What a run says and writes at start: the learning rate used, shuffle BN on one BN group,
the loader's augmentation, and config.yaml in the run directory."""

import yaml
from conftest import tiny_train_config

from fastmoco.cli import build_parser, config_from_args
from fastmoco.config import PRESETS, TrainConfig
from fastmoco.engine import train
from fastmoco.engine.notices import loader_notice, lr_notice
from fastmoco.models import MoCo, MoCoV3


def test_run_prints_lr_and_one_group_warning_and_writes_config(tiny_data, tmp_path, capsys):
    cfg = tiny_train_config(tiny_data, tmp_path / "run", epochs=1, bn_splits=1, lr=0.08)
    train(cfg)
    out = capsys.readouterr().out
    assert "learning rate 0.0025 = --lr 0.08 x batch 8 / 256 (--lr-scaling linear" in out
    assert "warning: shuffle BN on one device with one BN group shuffles nothing" in out
    assert "--bn-splits 8" in out
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert TrainConfig.from_dict(written).recipe_dict() == cfg.recipe_dict()
    # the recipe only: what to resume, overwrite or trust is never written down
    assert not {"out", "resume", "force", "trust_checkpoint"} & set(written)


def test_lr_scaling_semantics():
    """v1/v2 take --lr as given (the official advice --lr 0.015 --batch-size 128 means
    0.015); linear scaling multiplies by batch/256 (moco-v3)."""
    argv = ["train", "--preset", "mocov2", "--lr", "0.015", "--batch-size", "128"]
    cfg = config_from_args(build_parser().parse_args(argv), PRESETS, "mocov2")
    assert cfg.effective_lr() == 0.015 and "as given" in lr_notice(cfg)
    cfg = config_from_args(
        build_parser().parse_args([*argv, "--lr-scaling", "linear"]), PRESETS, ""
    )
    assert cfg.effective_lr() == 0.015 * 128 / 256
    v3 = PRESETS["mocov3"]
    assert v3.lr_scaling == "linear" and v3.effective_lr() == 0.6 * 4096 / 256


def test_shuffle_bn_warning_only_when_it_does_nothing():
    """MoCo says it (its notices()); the trainer prints what the method says."""

    def notes(world_size=1, **kw):
        args = dict(dim=8, K=64, mlp_hidden=0, small_images=True, shuffle_bn=True, bn_splits=1)
        return MoCo("resnet-tiny", **{**args, **kw}).notices(world_size)

    assert notes() and "shuffles nothing" in notes()[0]
    assert notes(world_size=2) == []
    assert notes(bn_splits=8) == []
    assert notes(shuffle_bn=False) == []
    v3 = MoCoV3("resnet-tiny", dim=8, mlp_dim=16, small_images=True)
    assert v3.notices(1) == []  # no shuffle BN in v3
    assert PRESETS["cifar"].bn_splits == 8  # the official demo's simulated GPUs


def test_loader_notice_names_the_dali_differences():
    assert loader_notice("torch DataLoader (2 workers)") is None
    note = loader_notice("DALI (cuda:0, 4 threads)")
    assert "differ from torchvision" in note and "nvJPEG" in note and "--loader torch" in note
