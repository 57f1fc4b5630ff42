"""Configuration files: the resolved TrainConfig as YAML out, a file of fields (YAML or JSON)
in.

`fastmoco train` writes config.yaml into the run directory at every start: the recipe of
the run (TrainConfig.recipe_dict), reusable as `--config` for a new run; `--config FILE`
reads such a file (or any subset of its fields) as the base that flags override;
`--print-config` prints the resolved YAML without training.

A config file is input that people share and download, so it is read as data and
checked: every value is converted to its field's type or refused naming the file and key,
unknown keys get a suggestion, and the fields that only the command line may set
(config.COMMAND_LINE_ONLY: what to resume, what to overwrite, whether to trust a pickle)
are refused with the flag that sets them.
"""

import dataclasses
import difflib
import json
from pathlib import Path

import yaml

from fastmoco.config import COMMAND_LINE_ONLY, coerce, field_types, flag
from fastmoco.errors import UsageError

CONFIG_NAME = "config.yaml"


def to_yaml(cfg) -> str:
    """The config's recipe as YAML, fields in declaration order, tuples as lists."""
    return yaml.safe_dump(cfg.recipe_dict(), sort_keys=False, default_flow_style=None)


def write_config(cfg, run_dir) -> Path:
    path = Path(run_dir) / CONFIG_NAME
    path.write_text(to_yaml(cfg))
    return path


def read_config_file(path, cls, command_line_only=COMMAND_LINE_ONLY) -> dict:
    """The fields a YAML or JSON file sets, each converted to its type in dataclass cls.

    Refused, naming the file and the key: unknown names (with the nearest field), values
    that do not fit the field's type, and the command_line_only fields (with their flag)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise UsageError(f"--config {path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise UsageError(
            f"--config {path}: not UTF-8 text (byte {e.start}); save it as UTF-8 YAML or JSON"
        ) from None
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise UsageError(f"--config {path}: not valid {path.suffix[1:] or 'YAML'}: {e}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: needs a mapping of field: value, got {values!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if not isinstance(key, str) or key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise UsageError(
                f"--config {path}: unknown field {key!r}{hint}; the fields are those "
                "`fastmoco train --print-config` prints"
            )
    banned = [k for k in values if k in command_line_only]
    if banned:
        k = banned[0]
        raise UsageError(
            f"--config {path}: {k!r} can only be given on the command line ({flag(k)}): a "
            "config file is shared and downloaded, so it may not choose what is resumed, "
            "overwritten or unpickled; remove it from the file"
        )
    types = field_types(cls)
    return {k: coerce(k, v, types[k], f"--config {path}: {k}") for k, v in values.items()}


def run_dir_hint(path) -> str | None:
    """When --config names a run directory's config.yaml: how to continue that run instead."""
    path = Path(path)
    if path.name == CONFIG_NAME and any(path.parent.glob("checkpoint*.pt")):
        return (
            f"note: {path} is the recipe of the run in {path.parent}; this starts a new run from "
            f"it. To continue that run, use --resume {path.parent}"
        )
    return None
