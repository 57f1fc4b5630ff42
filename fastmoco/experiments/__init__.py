"""Experiments built on the training engine: `fastmoco compare` (compare.py)."""
