"""Evaluation of pre-trained encoders: `fastmoco knn` (knn_command) and the linear
classification protocols (lincls). Both read a checkpoint's settings from it
(engine/checkpoint_io.py) and use the engine's kNN monitor (engine/knn.py), run
directories and launch: this package sits above the engine and nothing below imports it.
"""
