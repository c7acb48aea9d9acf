"""Dataset ingestion: read an upload safely, parse its records into conversations, report on it,
store it. Every rejection names the file, record and field; a rejected upload stores nothing."""
