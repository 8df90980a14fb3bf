# One image for the API, the worker and the migrations; docker-compose.yml picks the command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY core ./core
COPY app ./app
COPY worker ./worker
COPY cli ./cli
COPY migrations ./migrations
RUN pip install .

RUN useradd --create-home --uid 1000 harden && mkdir -p /data/storage && chown -R harden /data
USER harden

ENV HARDEN_STORAGE_DIR=/data/storage \
    HARDEN_DATA_ROOTS=/datasets
EXPOSE 8000
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000"]
