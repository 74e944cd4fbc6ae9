# The entraflow image: the project installed with pip as the README installs it, with the
# PostgreSQL driver (the `postgres` extra) and without dev tools; one image for every service.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Every package of `[tool.setuptools.packages.find]`; their package data (example flows and
# events, migrations) travels inside them.
COPY pyproject.toml README.md ./
COPY entraflow ./entraflow
COPY worker ./worker
COPY scheduler ./scheduler
COPY models ./models
COPY sandbox ./sandbox
COPY harness ./harness
COPY cli ./cli
RUN pip install '.[postgres]' && rm -rf /src

# A fixed, unprivileged user; /data (ENTRAFLOW_HOME) is created here so a new named volume
# mounted on it takes this owner.
ARG UID=10001
RUN useradd --uid "${UID}" --create-home --shell /usr/sbin/nologin entraflow \
    && install -d -o entraflow -g entraflow /data
USER entraflow
WORKDIR /data
CMD ["entraflow", "--help"]
