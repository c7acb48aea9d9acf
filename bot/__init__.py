"""The Slack app: listeners grouped by surface, Block Kit built by pure functions, the notifier.
Never imports torch or vLLM."""
