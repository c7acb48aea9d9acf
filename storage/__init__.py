"""Storage: SQLModel tables, engine and sessions, migrations, and the artifact store.
No Slack, no torch."""
