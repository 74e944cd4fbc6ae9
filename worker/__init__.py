"""The Celery worker side of entraflow: the Graph client, the actions and the tasks."""
