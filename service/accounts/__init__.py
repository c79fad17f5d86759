"""User accounts and their API keys (SQL in `repository`)."""
