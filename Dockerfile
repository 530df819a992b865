# lanceflow worker image: the flows, their dependencies and the bundled local model with its
# prepared int8 ONNX file. No ENTRYPOINT: Docker and Kubernetes workers run their own command
# (`prefect flow-run execute`) in it.
#
#   docker build -t lanceflow:latest .                        # CPU torch
#   docker build -t lanceflow:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
# where torch comes from: the CPU wheels by default; a CUDA wheel index for a GPU image
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    LANCEFLOW_CACHE_DIR=/var/cache/lanceflow \
    LANCEFLOW_CODE_DIR=/app

RUN groupadd --system --gid 10001 lanceflow \
    && useradd --system --uid 10001 --gid lanceflow --create-home --home-dir /home/lanceflow lanceflow \
    && mkdir -p /app /data /var/cache/lanceflow \
    && chown lanceflow:lanceflow /data /var/cache/lanceflow

WORKDIR /app

# the same order as `make install`: torch pinned first, so nothing pulls another build
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# dependencies in their own layer: only a change of pyproject.toml reinstalls them
COPY pyproject.toml README.md ./
# the versions are the ranges pyproject.toml declares, as `make install` resolves them
# hadolint ignore=DL3013
RUN mkdir -p flows tasks/embedders \
    && touch flows/__init__.py tasks/__init__.py tasks/embedders/__init__.py \
    && pip install --no-cache-dir ".[local,s3,gcs,azure]" \
    && pip uninstall -y lanceflow \
    && rm -rf flows tasks build

COPY flows ./flows
COPY tasks ./tasks
COPY deployments ./deployments
COPY samples ./samples
RUN pip install --no-cache-dir --no-deps .

USER 10001:10001
# resolve the bundled model, hash its revision and export its int8 ONNX file into the cache,
# so a worker's first run starts at once (no ingest at build time)
RUN lanceflow prepare-model

VOLUME ["/data"]
CMD ["lanceflow", "--help"]
