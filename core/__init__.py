"""The small shared core every process imports: the prompt/label protocol, typed errors,
enums and settings. Nothing here imports torch, vLLM, Slack or the database."""
