"""Notices between replicas (key revoked, user erased, adapter changed): the SQL outbox and its poller."""
