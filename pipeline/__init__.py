"""Offline knowledge distillation for causal language models.

Stages (one module each): data -> teacher -> cache -> train -> compare.
"""

__version__ = "0.1.0"
