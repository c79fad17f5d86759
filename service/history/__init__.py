"""A user's behaviour history and profile: schemas, SQL repository, service."""
