"""Pydantic models shared by the gateway, the workers and the engine: the contract of Tightrope.

Nothing here imports torch, FastAPI, Celery or SQLAlchemy.
"""
