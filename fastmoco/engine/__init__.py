from .trainer import Interrupted, Trainer, lr_at, train

__all__ = ["Interrupted", "Trainer", "lr_at", "train"]
