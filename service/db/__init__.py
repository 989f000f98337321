"""Persistence: SQLAlchemy models and sessions. Shared with the workers (no FastAPI here)."""
