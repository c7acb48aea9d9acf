"""Evaluation: greedy batch prediction on the eval split and honest scores (parsed-label accuracy,
macro-F1, per-class scores, confusion), with ROUGE/BLEU computed as LLaMA-Factory computes them."""
