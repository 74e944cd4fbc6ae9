# The entraflow image: the project installed as the README installs it, without dev tools.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY entraflow ./entraflow
COPY worker ./worker
COPY scheduler ./scheduler
COPY models ./models
COPY sandbox ./sandbox
RUN pip install --no-cache-dir '.[postgres]'
USER nobody
ENTRYPOINT []
