from fastmoco.errors import Interrupted

from .optim import lr_at
from .trainer import Trainer, train

__all__ = ["Interrupted", "Trainer", "lr_at", "train"]
