"""Smaller and faster models from a trained one: int8 weights (``quantize``), magnitude pruning (``prune``, used
by the trainer's ``prune`` key) and distillation from a teacher (``distill``, the trainer's ``distill`` key).
``mmstory compress quantize MODEL OUT`` and ``mmstory compress info MODEL`` are in ``mmstory/compress_cli.py``."""
