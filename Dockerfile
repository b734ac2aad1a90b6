# kubetasks: the one process every pod of the Helm chart runs (`kubetasks run`).
# Build:  docker build -t kubetasks:0.1.0 .
# Your handlers: FROM kubetasks:0.1.0, COPY your package into /app (the working
# directory, which `--app module:attr` imports from), and if it has
# dependencies, install them as root before switching back to USER 10001.
# Debian 12 (bookworm) and Python 3.11: what e2e/cluster/image.py builds without Docker
# (tests/packaging/test_dockerfile.py keeps the two in step).

# The dashboard's page (dashboard-ui/: Preact, uPlot, dagre), bundled by Vite. Only the
# built page leaves this stage: the image carries no Node.js.
FROM node:20-bookworm-slim AS ui
WORKDIR /src/dashboard-ui
COPY dashboard-ui ./
RUN npm ci --no-audit --no-fund && npm run build

FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The chart runs the container as uid/gid 10001 with a read-only root file
# system and a writable emptyDir at /tmp.
RUN groupadd --system --gid 10001 kubetasks \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /app \
      --shell /usr/sbin/nologin kubetasks

WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY --from=ui /src/operator/kubetasks/dashboard/static ./operator/kubetasks/dashboard/static
RUN pip install --no-cache-dir . && rm -rf /src

WORKDIR /app
USER 10001:10001
# /healthz, /readyz and /metrics (KUBETASKS_METRICS_PORT; the chart sets 9090)
EXPOSE 9090
ENTRYPOINT ["kubetasks"]
CMD ["run"]
