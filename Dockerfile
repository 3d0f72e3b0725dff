# repost-monitor daemon. Build: docker build -t repost-monitor .
# Run:   docker run -v $PWD/config.toml:/etc/repost-monitor/config.toml:ro \
#               -v repost-data:/var/lib/repost-monitor -p 8080:8080 repost-monitor
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NUMBA_CACHE_DIR=/var/cache/repost-monitor/numba \
    REPOST_MONITOR_CACHE=/var/cache/repost-monitor/fingerprints.sqlite

RUN groupadd --system --gid 10001 monitor \
    && useradd --system --uid 10001 --gid monitor --home-dir /var/lib/repost-monitor monitor

# The source is removed once installed: numba keys its cache on the path of the code it
# compiled, so the kernels must be compiled from the installed package the daemon runs
# (a copy left in the working directory would be imported instead and cached in vain).
WORKDIR /src
COPY pyproject.toml README.md ./
COPY monitor ./monitor
COPY feeds ./feeds
RUN pip install --no-compile . \
    && mkdir -p /var/lib/repost-monitor /var/cache/repost-monitor/numba /etc/repost-monitor \
    && chown -R 10001:10001 /var/lib/repost-monitor /var/cache/repost-monitor \
    && rm -rf /src

WORKDIR /var/lib/repost-monitor
USER 10001
# Compile the numba kernels once into the image's cache, not on first request.
RUN python -c "from monitor.warmup import warm_up; warm_up(None)"

VOLUME ["/var/lib/repost-monitor"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]

ENTRYPOINT ["repost-monitor", "run", "--config", "/etc/repost-monitor/config.toml"]
