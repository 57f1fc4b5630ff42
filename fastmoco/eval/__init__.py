"""Evaluation of pre-trained encoders: the weighted kNN monitor (knn), `fastmoco knn`
(knn_command) and linear classification (lincls).

Imports run one way: engine.trainer imports eval.knn, and eval.knn_command / eval.lincls
import engine (checkpoints in, run directories); this package imports only knn, so
importing it never pulls in engine.
"""

from .knn import build_knn_loaders, extract_features, knn_accuracy, knn_predict

__all__ = ["build_knn_loaders", "extract_features", "knn_accuracy", "knn_predict"]
