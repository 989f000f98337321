"""The audit engine: pure PyTorch + deepinv. No Celery, FastAPI or database imports.

Entry points for the runner and the local CLI live in workers.engine.api.
"""
