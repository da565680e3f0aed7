# syntax=docker/dockerfile:1
# The serving image: the gRPC and HTTP service on ONNX Runtime, nothing from the PyTorch side.
#
#   docker build --target cpu -t vae-serve:cpu .          # python:3.11-slim + onnxruntime
#   docker build --target gpu -t vae-serve:gpu .          # CUDA 13 + cuDNN 9 runtime + onnxruntime-gpu
#   docker run -p 50051:50051 -p 8000:8000 -p 9090:9090 -v $PWD/models:/models:ro vae-serve:cpu [--flags ...]
#
# Without a registry (this project's machines) `make image` builds the CPU target with podman from a
# local Debian base (deploy/base-image.sh) and wheels downloaded beforehand (`make wheels`).
# Build arguments:
#   BASE       CPU base image, Python 3.11 (default: the official python:3.11-slim)
#   GPU_BASE   GPU base image: an NVIDIA CUDA runtime image with cuDNN matching onnxruntime-gpu
#   MODEL_REPO a folder of the build context baked in at /models (default: an empty repository)
#   UID        the non-root user the server runs as

ARG BASE=python:3.11-slim
ARG GPU_BASE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------------
# CPU: packages and service installed in a builder; the serving stage copies the finished folder.
FROM ${BASE} AS cpu-build
COPY deploy/requirements-cpu.txt deploy/install-packages.sh /tmp/build/
COPY deploy/wheels/ /tmp/build/wheels/
COPY service/ /opt/vae/app/service/
COPY deploy/healthcheck.py /opt/vae/app/healthcheck.py
RUN sh /tmp/build/install-packages.sh /tmp/build/requirements-cpu.txt /tmp/build/wheels

FROM ${BASE} AS cpu
ARG UID=10001
ARG MODEL_REPO=deploy/model-repo
RUN groupadd --gid ${UID} vae \
 && useradd --uid ${UID} --gid ${UID} --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin vae
COPY --from=cpu-build /opt/vae /opt/vae
COPY ${MODEL_REPO} /models
ENV PYTHONPATH=/opt/vae/app:/opt/vae/lib \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VAE_MODEL_REPO=/models \
    VAE_PORT=50051 \
    VAE_HTTP_PORT=8000 \
    VAE_METRICS_PORT=9090 \
    VAE_DEVICE=cpu
WORKDIR /opt/vae/app
USER ${UID}:${UID}
EXPOSE 50051 8000 9090
# grpc.health.v1 over the server's own port (deploy/healthcheck.py reads it from PID 1's flags).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "/opt/vae/app/healthcheck.py"]
# The server drains on SIGTERM within --grace-seconds (default 10): give `docker stop` more (-t 15).
STOPSIGNAL SIGTERM
ENTRYPOINT ["python3", "-m", "service"]

# ---------------------------------------------------------------------------------------------------
# GPU: the same service on the CUDA runtime image (Ubuntu 24.04, its python3 is 3.12) with
# onnxruntime-gpu from the package index. Not built on this project's machines (no CUDA base image
# reachable there); written from the NVIDIA and ONNX Runtime documentation.
FROM ${GPU_BASE} AS gpu-python
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/*

FROM gpu-python AS gpu-build
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-pip \
 && rm -rf /var/lib/apt/lists/*
COPY deploy/requirements-gpu.txt deploy/install-packages.sh /tmp/build/
COPY service/ /opt/vae/app/service/
COPY deploy/healthcheck.py /opt/vae/app/healthcheck.py
RUN sh /tmp/build/install-packages.sh /tmp/build/requirements-gpu.txt

FROM gpu-python AS gpu
ARG UID=10001
ARG MODEL_REPO=deploy/model-repo
RUN groupadd --gid ${UID} vae \
 && useradd --uid ${UID} --gid ${UID} --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin vae
COPY --from=gpu-build /opt/vae /opt/vae
COPY ${MODEL_REPO} /models
ENV PYTHONPATH=/opt/vae/app:/opt/vae/lib \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VAE_MODEL_REPO=/models \
    VAE_PORT=50051 \
    VAE_HTTP_PORT=8000 \
    VAE_METRICS_PORT=9090 \
    VAE_DEVICE=auto \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /opt/vae/app
USER ${UID}:${UID}
EXPOSE 50051 8000 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "/opt/vae/app/healthcheck.py"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python3", "-m", "service"]

# ---------------------------------------------------------------------------------------------------
# The default target (a plain `docker build .`) is the CPU image.
FROM cpu
