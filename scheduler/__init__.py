"""The scheduler: turns events into flow runs and queues them as Celery chains."""
