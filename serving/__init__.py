"""Serving: FastAPI around a vLLM engine with the base model loaded once and promoted LoRA
adapters hot-swapped at run time; a transformers backend only where vLLM cannot be installed."""
