# lanceflow worker image: CPU torch, the project with the bundled local model.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    LANCEFLOW_CACHE_DIR=/var/cache/lanceflow

WORKDIR /app
# torch first, pinned, so nothing pulls another build; pass the PyTorch CPU wheel index as
# TORCH_INDEX_URL for a small CPU-only image
ARG TORCH_INDEX_URL=""
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY flows ./flows
COPY tasks ./tasks
COPY deployments ./deployments
COPY samples ./samples
RUN pip install --no-cache-dir ".[local,s3,gcs,azure]" \
    # export the int8 ONNX model once at build time so workers start fast
    && lanceflow ingest samples/corpus --table /tmp/warmup && rm -rf /tmp/warmup

ENTRYPOINT ["lanceflow"]
CMD ["--help"]
