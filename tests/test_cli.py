"""The command line: one parser module, every config field a flag, one config_from_args."""

import dataclasses

import pytest

from fastmoco import cli
from fastmoco.config import PRESETS, TrainConfig, field_docs, field_groups
from fastmoco.eval.lincls import PRESETS as LINCLS_PRESETS
from fastmoco.eval.lincls import LinclsConfig


def _other_value(field: dataclasses.Field, current, choices):
    """A command-line value for `field` that differs from `current` (one of the flag's
    choices if it has some), and the config value it must become."""
    flag = "--" + field.name.replace("_", "-")
    if isinstance(current, bool):
        return ([f"--{'no-' if current else ''}{field.name.replace('_', '-')}"], not current)
    if choices:
        new = next(c for c in choices if c != current)
        return ([flag, str(new)], new)
    if isinstance(current, tuple):
        new = tuple(type(v)(v + 1) for v in current)
        return ([flag, *map(str, new)], new)
    if isinstance(current, int):
        return ([flag, str(current + 3)], current + 3)
    if isinstance(current, float):
        return ([flag, str(current * 0.5 + 0.125)], current * 0.5 + 0.125)
    return ([flag, "some/path"], "some/path")


@pytest.mark.parametrize(
    "command, cls, presets, shown",
    [
        ("train", TrainConfig, PRESETS, "mocov2"),
        ("lincls", LinclsConfig, LINCLS_PRESETS, "official"),
    ],
)
def test_every_field_has_a_flag_that_sets_it(command, cls, presets, shown):
    """Each field's flag, given alone, changes exactly that field of the preset; every field
    has its description (the docstring under it) and a named section (none in 'other')."""
    groups = field_groups(cls)
    listed = {name for names in groups.values() for name in names}
    names = [f.name for f in dataclasses.fields(cls)]
    assert set(names) == listed and "other" not in groups, set(names) ^ listed
    assert set(field_docs(cls)) == set(names), set(names) - set(field_docs(cls))
    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]  # argparse has no public API
    parser_actions = sub._actions
    given = {"data": "d"} | ({"pretrained": "p.pt"} if command == "lincls" else {})
    base_args = [a for k, v in given.items() for a in (f"--{k}", v)]
    base = cli.config_from_args(parser.parse_args([command, *base_args]), presets, shown)
    assert base == presets[shown].replace(**given)
    for f in dataclasses.fields(cls):
        if f.name in ("preset", "data", "pretrained"):
            continue
        current = getattr(base, f.name)
        if current is None:  # optional fields: a value of the annotated type
            current = {"arch": "", "out": "", "resume": ""}.get(f.name, current)
            if current is None:
                elem, nargs = cli._flag_type(f.type)
                current = tuple(elem(0) for _ in range(nargs)) if nargs else elem(0)
        action = next(a for a in parser_actions if a.dest == f.name)
        argv, want = _other_value(f, current, action.choices)
        cfg = cli.config_from_args(parser.parse_args([command, *base_args, *argv]), presets, shown)
        changed = {
            g.name for g in dataclasses.fields(cls) if getattr(cfg, g.name) != getattr(base, g.name)
        }
        assert changed == {f.name} and getattr(cfg, f.name) == want, (f.name, argv)


def test_preset_then_flags_move_lr_steps():
    """`--preset mocov1 --epochs 100 --lr-steps 60 80`: the v1 step schedule moves with the
    shorter run (the flag did not exist before)."""
    args = cli.build_parser().parse_args(
        ["train", "--preset", "mocov1", "--epochs", "100", "--lr-steps", "60", "80"]
    )
    cfg = cli.config_from_args(args, PRESETS, "mocov2")
    assert (cfg.preset, cfg.schedule, cfg.epochs, cfg.lr_steps) == ("mocov1", "step", 100, (60, 80))
    assert cfg.temperature == PRESETS["mocov1"].temperature


@pytest.mark.parametrize("command", ["train", "knn", "lincls", "export", "compare"])
def test_help_pages_quote_no_none_defaults(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "default: None" not in text and "None]" not in text
    if command == "knn":
        assert "neighbours" in text and "vote temperature" in text


def test_train_help_is_current(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "v1/v2 encoder" not in text and "MoCo v1/v2/v3" in text
    assert "lr x batch-size / 256" in text  # the learning-rate rule is stated


def test_no_parser_outside_cli():
    """One command-line module: no other fastmoco module builds an argparse parser (the demo
    generator's own `python -m fastmoco.data.demo` aside)."""
    from pathlib import Path

    import fastmoco

    root = Path(fastmoco.__file__).parent
    builders = [
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if "add_parser(" in p.read_text() or "config_from_args" in p.read_text()
    ]
    assert builders == ["cli.py"], builders


def test_config_file_round_trips_and_flags_override_it(tmp_path, capsys):
    """--print-config's YAML, read back with --config, resolves to the same config; flags
    given beside --config win; JSON works too; unknown fields are refused by name."""
    argv = ["train", "--preset", "mocov1", "--epochs", "100", "--lr-steps", "60", "80"]
    assert cli.main([*argv, "--crop-scale", "0.3", "0.9", "--print-config"]) == 0
    first = capsys.readouterr().out
    path = tmp_path / "c.yaml"
    path.write_text(first)
    assert cli.main(["train", "--config", str(path), "--print-config"]) == 0
    assert capsys.readouterr().out == first
    parser = cli.build_parser()
    cfg = cli.config_from_args(
        parser.parse_args(["train", "--config", str(path), "--epochs", "5"]), PRESETS, "mocov2"
    )
    want = PRESETS["mocov1"].replace(epochs=5, lr_steps=(60, 80), crop_scale=(0.3, 0.9))
    assert cfg == want
    js = tmp_path / "c.json"
    js.write_text('{"preset": "mocov2", "temperature": 0.5}')
    cfg = cli.config_from_args(parser.parse_args(["train", "--config", str(js)]), PRESETS, "")
    assert cfg == PRESETS["mocov2"].replace(temperature=0.5)
    js.write_text('{"temprature": 0.5}')
    assert cli.main(["train", "--config", str(js), "--print-config"]) == 2
    assert "unknown field 'temprature' (did you mean temperature?)" in capsys.readouterr().err
