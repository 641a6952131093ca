"""Celery workers: image generation, webhook delivery and the periodic sweep."""
