from .knn import build_knn_loaders, extract_features, knn_accuracy, knn_predict

__all__ = ["build_knn_loaders", "extract_features", "knn_accuracy", "knn_predict"]
