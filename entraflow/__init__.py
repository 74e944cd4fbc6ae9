"""entraflow: Microsoft Entra ID actions as automated flows, on Celery and Redis."""
