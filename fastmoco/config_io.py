"""Configuration files: the resolved TrainConfig as YAML (or JSON) out, a file of fields in.

`fastmoco train` writes config.yaml into the run directory at every start; `--config FILE`
reads such a file (or any subset of its fields, YAML or JSON) as the base that flags
override; `--print-config` prints the resolved YAML without training.
"""

import dataclasses
import json
from pathlib import Path

import yaml

from fastmoco.errors import UsageError

CONFIG_NAME = "config.yaml"


def to_yaml(cfg) -> str:
    """The config as YAML, fields in declaration order, tuples as lists."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)


def write_config(cfg, run_dir) -> Path:
    path = Path(run_dir) / CONFIG_NAME
    path.write_text(to_yaml(cfg))
    return path


def read_config_file(path, cls) -> dict:
    """The fields a YAML or JSON file sets, checked against dataclass cls: names it does not
    have and values that are not plain YAML/JSON scalars or lists are refused."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UsageError(f"--config {path}: cannot read it ({e.strerror})") from None
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise UsageError(f"--config {path}: not valid {path.suffix[1:] or 'YAML'}: {e}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: needs a mapping of field: value, got {values!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UsageError(
            f"--config {path}: unknown field(s) {', '.join(unknown)}; the fields are those "
            "`fastmoco train --print-config` prints"
        )
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
