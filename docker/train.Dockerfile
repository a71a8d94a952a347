# clipforge train stage: `docker build -f docker/train.Dockerfile -t REGISTRY/clipforge-train:TAG .`
# Base: CUDA PyTorch base: torch==2.14.1 from constraints.txt is already there; the pipeline extra brings the PyTorchJob launcher and torchx.
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NO_ALBUMENTATIONS_UPDATE=1 \
    HOME=/home/clipforge

# uid/gid 1000 matches runAsUser/runAsGroup in k8s/; some bases already have a user 1000.
RUN (getent group 1000 >/dev/null || groupadd --gid 1000 clipforge) \
 && (getent passwd 1000 >/dev/null || useradd --uid 1000 --gid 1000 --no-create-home --shell /usr/sbin/nologin clipforge) \
 && mkdir -p /home/clipforge && chown 1000:1000 /home/clipforge

WORKDIR /opt/clipforge
COPY pyproject.toml constraints.txt README.md ./
COPY stages ./stages
COPY pipelines ./pipelines
# Versions come from constraints.txt; kfp runs the pipeline's step function inside this image.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir -c constraints.txt ".[train,pipeline]"

USER 1000:1000
ENTRYPOINT ["python", "-m", "stages.train"]
