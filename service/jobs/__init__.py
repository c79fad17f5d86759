"""Training jobs: SQL job state (the truth), a queue (RQ on Redis, or in-process), job bodies."""
