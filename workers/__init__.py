"""Celery tasks, the sandboxed runner and the audit engine.

The Celery process (workers.celery_app, workers.tasks) never imports torch; only the runner
child (python -m workers.runner) and the local CLI's `audit` command load workers.engine.
"""
