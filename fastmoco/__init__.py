"""fastmoco: fast, dependable MoCo training and fused contrastive ops."""

__version__ = "0.1.0"
