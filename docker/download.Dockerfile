# clipforge download stage: `make images` builds it (docker/build.py); by hand:
#   docker build -f docker/download.Dockerfile -t REGISTRY/clipforge-download:TAG .
# Layers: base, then dependency layers shared by the images (identical instructions hit the build
# cache), then the clipforge source on top, so a source change rebuilds only the top layers.
# The download stage never imports torch: its image has none.
ARG BASE_IMAGE=python:3.11.14-slim-bookworm
FROM ${BASE_IMAGE}

# An air-gapped build installs from a wheelhouse: --build-arg WHEELHOUSE=URL (a directory listing of
# wheels, e.g. served on loopback by docker/build.py with `docker build --network host`).
ARG WHEELHOUSE=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NO_ALBUMENTATIONS_UPDATE=1 \
    HOME=/home/clipforge \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

WORKDIR /opt/clipforge
COPY pyproject.toml constraints.txt docker/deps.py ./
# uid/gid 1000 matches runAsUser/runAsGroup in k8s/; the root filesystem is read-only at run time,
# so HOME is an emptyDir/tmpfs mount point owned by that user.
# hadolint ignore=SC2046
RUN (getent group 1000 >/dev/null || groupadd --gid 1000 clipforge) \
 && (getent passwd 1000 >/dev/null || useradd --uid 1000 --gid 1000 --no-create-home --shell /usr/sbin/nologin clipforge) \
 && mkdir -p /home/clipforge && chown 1000:1000 /home/clipforge \
 && python3 -m venv $VIRTUAL_ENV \
 && pip install --no-cache-dir ${WHEELHOUSE:+--no-index --find-links $WHEELHOUSE} -c constraints.txt $(python3 deps.py core) kfp

# img2dataset and friends; no torch.
# hadolint ignore=SC2046
RUN pip install --no-cache-dir ${WHEELHOUSE:+--no-index --find-links $WHEELHOUSE} -c constraints.txt $(python3 deps.py download)

COPY . ./
RUN pip install --no-cache-dir ${WHEELHOUSE:+--no-index --find-links $WHEELHOUSE} -c constraints.txt --no-deps . \
 && rm -rf build ./*.egg-info

USER 1000:1000
ENTRYPOINT ["python", "-m", "stages.download"]
