"""Encryption at rest: every user's data sealed under their own data key (see service.sealing.service)."""
