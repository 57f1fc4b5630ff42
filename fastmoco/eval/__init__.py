"""Evaluation: the kNN monitor, linear classification, checkpoints in and out.

checkpoint_io, knn_command and lincls are imported on first use (module __getattr__):
they import fastmoco.engine, whose trainer imports fastmoco.eval.knn, so importing them
here would make a cycle.
"""

from .knn import build_knn_loaders, extract_features, knn_accuracy, knn_predict

__all__ = [
    "LinclsConfig",
    "Pretrained",
    "build_knn_loaders",
    "export_checkpoint",
    "extract_features",
    "knn_accuracy",
    "knn_command",
    "knn_predict",
    "lincls",
    "load_backbone",
    "read_pretrained",
]

_LAZY = {
    "Pretrained": "checkpoint_io",
    "export_checkpoint": "checkpoint_io",
    "load_backbone": "checkpoint_io",
    "read_pretrained": "checkpoint_io",
    "knn_command": "knn_command",
    "LinclsConfig": "lincls",
    "lincls": "lincls",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
