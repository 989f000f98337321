"""Celery tasks, the sandboxed runner and the audit engine.

The Celery process (workers.execution.celery_app, workers.execution.tasks) never imports torch;
only the runner
child (python -m workers.sandbox.runner) and the local CLI's `audit` command load workers.engine;
the rest imports the engine's torch-free helpers from workers.shared (tests/test_layers.py).
"""
