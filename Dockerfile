# syntax=docker/dockerfile:1
# The syntax line pins a frontend that understands RUN --mount, which the runtime stage relies on to keep
# the wheels out of the final image's layers.

ARG PYTHON_VERSION=3.11

# ---------------------------------------------------------------------------------------------------------
# builder: turns the source tree into wheels (the gateway's own plus every runtime dependency), so the
# runtime stage never needs the source tree, a build backend, or network access to PyPI.
# ---------------------------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src

# Only what the wheel is built from: the build is cached until the package metadata or code changes, and
# tests/benchmarks can never leak into the image. README.md is listed because pyproject.toml declares it
# as the project's readme, so setuptools refuses to build without it.
COPY pyproject.toml README.md ./
COPY gateway ./gateway

# Every dependency ships manylinux wheels for amd64/arm64, so no compiler is installed here; if one ever
# falls back to an sdist, this is the stage to add build-essential to, never the runtime one.
RUN pip wheel --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------------------
# runtime
# ---------------------------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime

ARG VERSION=""
ARG REVISION=""
LABEL org.opencontainers.image.title="voipbin-gateway" \
      org.opencontainers.image.description="API gateway for the VoIPBIN REST API: auth, Redis rate limits, canonical errors, Prometheus metrics" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"

# A fixed, numeric uid/gid: volume permissions are predictable across rebuilds and Kubernetes'
# runAsNonRoot can verify it without resolving names. No home directory, no login shell.
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin gateway

# The wheels are bind-mounted from the builder rather than copied, so they never become a layer;
# --no-index proves the image is built from exactly what the builder resolved.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --disable-pip-version-check --find-links=/wheels \
        /wheels/voipbin_gateway-*.whl

# The baked-in config makes the image runnable on its own; deployments replace it by mounting a directory
# over /etc/voipbin-gateway (docker-compose.yml does) or by pointing GATEWAY_CONFIG elsewhere.
COPY config/gateway.yaml /etc/voipbin-gateway/gateway.yaml

# The listeners default to 127.0.0.1 for bare-metal safety, which would be unreachable from outside a
# container's network namespace, so the image binds all interfaces; publish ports selectively instead.
# PYTHONUNBUFFERED keeps log lines flowing to `docker logs` as they happen, not when a buffer fills.
# PYTHONDONTWRITEBYTECODE because site-packages is root-owned and the uid 10001 could not write .pyc anyway.
ENV GATEWAY_CONFIG=/etc/voipbin-gateway/gateway.yaml \
    GATEWAY_LISTEN=0.0.0.0:8080 \
    GATEWAY_ADMIN_LISTEN=0.0.0.0:9102 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

USER 10001:10001

# 8080: API traffic. 9102: admin (/healthz, /readyz, /metrics), meant for the orchestrator and Prometheus
# only, never for the public internet.
EXPOSE 8080 9102

# Slim images have no curl/wget, and python is already here. The port is read from GATEWAY_ADMIN_LISTEN so
# overriding that variable does not silently break the check (the check always dials loopback, which a
# 0.0.0.0 listener answers). urlopen raises on any non-2xx or connection error, which exits non-zero.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('GATEWAY_ADMIN_LISTEN', ':9102').rpartition(':')[2] or '9102'; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]

# SIGTERM is what `docker stop` and Kubernetes send before the kill; stated explicitly so a base image can
# never change it. The exec-form ENTRYPOINT keeps voipbin-gateway as PID 1, so the signal reaches it
# directly instead of a shell that would swallow it.
STOPSIGNAL SIGTERM

ENTRYPOINT ["voipbin-gateway"]
# The config path and listen addresses come from the ENV above, so `docker run IMAGE serve --workers 4` or
# `docker run IMAGE check-config` work without repeating them.
CMD ["serve"]
