"""Celery worker that runs hardening jobs; start one process per GPU."""
