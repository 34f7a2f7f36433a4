# lmwatch daemon image. Profiles, configuration and the store are mounted:
#   docker run -v ./profiles.yaml:/etc/lmwatch/profiles.yaml:ro \
#              -v ./config.yaml:/etc/lmwatch/config.yaml:ro \
#              -e LMWATCH_CONFIG=/etc/lmwatch/config.yaml \
#              -e LMWATCH_PROFILES_PATH=/etc/lmwatch/profiles.yaml \
#              -e LMWATCH_TOKEN_FILE=/run/secrets/lmwatch-token \
#              -v lmwatch-state:/var/lib/lmwatch -p 127.0.0.1:8787:8787 lmwatch
# Without a config it runs the simulator on its embedded inventory and profiles.
# Inside the container the daemon must listen on 0.0.0.0 to be reachable at all, so the
# image sets LMWATCH_ALLOW_INSECURE: publish the port on loopback as above, or mount a
# certificate and key and set LMWATCH_TLS_CERT / LMWATCH_TLS_KEY (README: Deploying).
# With TLS, point the HEALTHCHECK at https (or override it).
FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc pkg-config libvirt-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY lmwatch ./lmwatch
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[libvirt]'

FROM python:3.11-slim-bookworm
RUN apt-get update \
    && apt-get install -y --no-install-recommends libvirt0 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 lmwatch \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/lmwatch --create-home lmwatch \
    && mkdir -p /etc/lmwatch
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001:10001
ENV LMWATCH_STORE_PATH=/var/lib/lmwatch/lmwatch.db \
    LMWATCH_LISTEN_HOST=0.0.0.0 \
    LMWATCH_ALLOW_INSECURE=true \
    LMWATCH_PORT=8787
VOLUME ["/var/lib/lmwatch"]
EXPOSE 8787
HEALTHCHECK --interval=30s --timeout=3s CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8787/healthz', timeout=2)"]
ENTRYPOINT ["lmwatch", "serve"]
