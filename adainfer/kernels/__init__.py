"""Kernels with their plain-torch references. Nothing here imports adainfer."""

from adainfer.kernels.top2 import Top2, lm_head_top2, lm_head_top2_reference, top2_from_logits

__all__ = ["Top2", "lm_head_top2", "lm_head_top2_reference", "top2_from_logits"]
