"""Training: a readable recipe (``recipe.train``) over packed, answer-only batches.

Importable without the service stack (no storage, no Slack): the GPU benchmark runs it alone.
"""
