# syntax=docker/dockerfile:1
# One image for the four Canopy services; a Kubernetes Deployment picks the service with its
# command (`python -m services.gateway`, `.store`, `.decisions`, `.timers`).
#
# Build: docker build -t canopy:0.1.0 .   (the tag is pyproject.toml's version; deploy/k8s
# uses that image name and tag, and tests/deploy checks that they agree).
#
# The base is pinned to a patch release; the builder and the runtime use the same one, because
# the virtualenv copied between them points at that interpreter. For reproducible builds also
# pin its digest here (python:3.11.14-slim-bookworm@sha256:...) where the build can look it up.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# Builder: a virtualenv without pip holding exactly the runtime lock (requirements.lock, made
# by `make lock` from pyproject.toml: every package pinned, every file's hash checked), then
# the project's own wheel without its dependencies (they are the lock's), and `pip check` that
# the lock meets what the wheel declares. The lock's layer comes first, so a change of the code
# alone reuses it. Anything that had to be compiled would be compiled here; nothing of this
# stage but the virtualenv reaches the final image.
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY requirements.lock ./
RUN python -m venv --without-pip /opt/canopy \
 && pip --python /opt/canopy/bin/python install --require-hashes --no-deps -r requirements.lock
COPY pyproject.toml ./
COPY services ./services
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && pip --python /opt/canopy/bin/python install --no-index --no-deps --find-links /wheels canopy \
 && pip --python /opt/canopy/bin/python check

# Runtime: the interpreter, the virtualenv and an unprivileged user; no pip, no compiler.
FROM ${PYTHON_IMAGE} AS runtime
RUN python -m pip uninstall --yes --quiet pip setuptools wheel \
 && groupadd --system --gid 10001 canopy \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin canopy
COPY --from=builder /opt/canopy /opt/canopy
# The root filesystem is read-only in Kubernetes: no .pyc written at run time (the wheels'
# were compiled at install), logs go to stdout unbuffered. CANOPY_HOST: listen beyond loopback.
ENV PATH=/opt/canopy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CANOPY_HOST=0.0.0.0
# Numeric, so that the kubelet can check runAsNonRoot without reading /etc/passwd.
USER 10001:10001
WORKDIR /opt/canopy
# gateway, store, decisions, timers (CANOPY_*_PORT defaults).
EXPOSE 8000 8001 8002 8003
LABEL org.opencontainers.image.title="canopy" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.description="Canopy services: gateway, store, decisions, timers"
CMD ["python", "-m", "services.gateway"]
