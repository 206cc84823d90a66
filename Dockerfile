# syntax=docker/dockerfile:1
#
# threshold, server or client, under twistd. See docs/docker.md.
#
#   docker build -t threshold .
#   docker run ... threshold                                   # the server
#   docker run ... threshold threshold-client -c /etc/threshold/client.json
#
# The image holds no keys and no configuration: mount them at /etc/threshold.

# -- build: a wheel of threshold and of each dependency ----------------------
FROM python:3.11-slim AS build

WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY threshold ./threshold
COPY twisted ./twisted
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# -- run ----------------------------------------------------------------------
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Install from the build stage's wheels only: no compiler, no source, no
# development dependencies in this image. Then load the twistd plugins once:
# Twisted caches its plugin index (dropin.cache) next to the plugins, which
# the unprivileged user cannot write at run time; it also checks that both
# plugins are installed.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels threshold \
    && twistd threshold-server --help >/dev/null \
    && twistd threshold-client --help >/dev/null

# A fixed numeric uid, so mounted files can be owned by it on the host.
RUN groupadd --system --gid 10001 threshold \
    && useradd --system --uid 10001 --gid threshold --no-create-home \
       --home-dir /var/lib/threshold --shell /usr/sbin/nologin threshold \
    && mkdir -p /var/lib/threshold /etc/threshold \
    && chown threshold:threshold /var/lib/threshold \
    && chmod 0700 /var/lib/threshold

USER threshold:threshold
WORKDIR /var/lib/threshold

# StateFile (the tunnels in force) lives here; the configuration, the CA,
# certificates and keys are mounted read-only at /etc/threshold.
VOLUME ["/var/lib/threshold"]

# TunnelControlPort and ManagementPort (the defaults); tunnel ports are opened
# at run time by PUT /tunnels.
EXPOSE 9056 9057

# No pid file (one process per container); log to stdout for `docker logs`.
ENTRYPOINT ["twistd", "-n", "--pidfile=", "--logfile=-"]
CMD ["threshold-server", "-c", "/etc/threshold/server.json"]
