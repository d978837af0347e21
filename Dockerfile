# Builds with BuildKit and with the legacy builder (DOCKER_BUILDKIT=0) alike, and needs nothing from the
# network but the base image and PyPI: hence no `# syntax=` line (BuildKit would pull that frontend as an
# image) and no RUN --mount (the legacy builder does not know it). The multi-stage build keeps wheels and
# build tools out of the runtime image instead.

ARG PYTHON_VERSION=3.11

# ---------------------------------------------------------------------------------------------------------
# builder: installs the gateway and every runtime dependency into a virtualenv at /opt/venv, so the runtime
# stage copies one directory and never needs the source tree, a build backend, wheels or access to PyPI.
# ---------------------------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# Without pip of its own: the base image's pip installs into it (--python), so the venv that ships holds
# the gateway and its dependencies only. Before the COPYs, so a code change does not redo this layer.
RUN python -m venv --without-pip /opt/venv

WORKDIR /src

# Only what the wheel is built from: the build is cached until the package metadata or code changes, and
# tests/benchmarks can never leak into the image. README.md is listed because pyproject.toml declares it
# as the project's readme, so setuptools refuses to build without it.
COPY pyproject.toml README.md ./
COPY gateway ./gateway

# Every dependency ships manylinux wheels for amd64/arm64, so no compiler is installed here; if one ever
# falls back to an sdist, this is the stage to add build-essential to, never the runtime one. pip builds the
# gateway's own wheel in a temporary directory and installs it; no wheel file stays behind. The .pyc files
# are compiled here, since the runtime user cannot write them (PYTHONDONTWRITEBYTECODE below).
RUN pip --python /opt/venv/bin/python install --no-cache-dir .

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

# The installed venv only, at the same path: its scripts' #! lines and pyvenv.cfg name /opt/venv and the
# base image's /usr/local/bin/python, which is why both stages start from the same base image. It stays
# root-owned: the uid 10001 can run the gateway, not change it.
COPY --from=builder /opt/venv /opt/venv

# The baked-in config makes the image runnable on its own; deployments replace it by mounting a directory
# over /etc/voipbin-gateway (docker-compose.yml does) or by pointing GATEWAY_CONFIG elsewhere.
COPY config/gateway.yaml /etc/voipbin-gateway/gateway.yaml

# The listeners default to 127.0.0.1 for bare-metal safety, which would be unreachable from outside a
# container's network namespace, so the image binds all interfaces; publish ports selectively instead.
# PYTHONUNBUFFERED keeps log lines flowing to `docker logs` as they happen, not when a buffer fills.
# PYTHONDONTWRITEBYTECODE because the venv is root-owned and the uid 10001 could not write .pyc anyway (and
# the root filesystem may be read-only: `docker run --read-only`).
ENV PATH=/opt/venv/bin:$PATH \
    GATEWAY_CONFIG=/etc/voipbin-gateway/gateway.yaml \
    GATEWAY_LISTEN=0.0.0.0:8080 \
    GATEWAY_ADMIN_LISTEN=0.0.0.0:9102 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

USER 10001:10001

# 8080: API traffic. 9102: admin (/healthz, /readyz, /metrics), meant for the orchestrator and Prometheus
# only, never for the public internet.
EXPOSE 8080 9102

# Slim images have no curl/wget, and need none: the gateway checks itself. `healthcheck` takes admin_listen
# and admin_tls from where `serve` does (GATEWAY_* variables, the file at GATEWAY_CONFIG), so a changed
# admin_listen or admin_tls moves the check with it, and validates only those keys (a file the gateway refused
# on reload does not fail it); it dials a 0.0.0.0 / [::] listener on loopback and uses https when
# admin_tls.cert_file is set. It exits 1 with the reason (in `docker inspect`) on anything but 200 within its
# own 3 s, which leaves --timeout's other 2 s for the interpreter's start on a busy host.
# Exec form: no shell needed, none involved.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["voipbin-gateway", "healthcheck"]

# SIGTERM is what `docker stop` and Kubernetes send before the kill; stated explicitly so a base image can
# never change it. The exec-form ENTRYPOINT keeps voipbin-gateway as PID 1, so the signal reaches it
# directly instead of a shell that would swallow it.
STOPSIGNAL SIGTERM

ENTRYPOINT ["voipbin-gateway"]
# The config path and listen addresses come from the ENV above, so `docker run IMAGE serve --workers 4` or
# `docker run IMAGE check-config` work without repeating them.
CMD ["serve"]
