"""Evaluation harness: python -m adainfer.eval (tasks x shots x methods) and python -m adainfer.eval.report."""
