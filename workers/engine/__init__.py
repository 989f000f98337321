"""The audit engine: pure PyTorch + deepinv. No Celery, FastAPI or database imports; its
torch-free helpers that the rest of workers/ uses too (errors, arrays, limits, panels) live in
workers.shared.

Entry points for the runner and the local CLI live in workers.engine.entry_points.
"""
