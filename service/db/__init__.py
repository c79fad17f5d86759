"""SQL: declarative base, models, engine/session factory. Schema changes go through migrations/."""
