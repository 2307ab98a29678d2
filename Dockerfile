# syntax=docker/dockerfile:1
#
# outbox-relay container image: built from this repository, run as a non-root user.
#
#   docker build -t outbox-relay .
#   docker run --rm -e OUTBOX_RELAY_POSTGRES_URL=... -e OUTBOX_RELAY_KAFKA_BROKERS=... \
#       -e OUTBOX_RELAY_POSTGRES_PASSWORD_FILE=/run/secrets/db-password outbox-relay run
#
# The image's entrypoint is the binary: pass the command (run, check, status) and
# flags, or configure it with OUTBOX_RELAY_* variables. docker-compose.yml at the top
# of the repository runs it beside PostgreSQL and Kafka; docs/deploy.md explains the
# settings.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# ---------------------------------------------------------------------------
# Build: librdkafka is compiled from source (cmake) against the system OpenSSL.
# ---------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake pkg-config libssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /build
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The workspace's other members (cargo reads their manifests; only the relay is built).
COPY testkit ./testkit
COPY bench ./bench
# Cache mounts keep the registry and the build between image builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/build/target \
    cargo build --release --locked --bin outbox-relay \
 && mkdir -p /out \
 && cp target/release/outbox-relay /out/outbox-relay \
 && strip --strip-debug /out/outbox-relay

# ---------------------------------------------------------------------------
# Runtime: Debian slim with OpenSSL and the CA bundle (for sslrootcert=system and
# Kafka TLS with the system's CAs); bash serves the healthcheck.
# ---------------------------------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 outbox-relay \
 && useradd --system --uid 10001 --gid outbox-relay --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin outbox-relay
COPY --from=build /out/outbox-relay /usr/local/bin/outbox-relay
COPY --chmod=0755 deploy/docker/healthcheck.sh /usr/local/bin/outbox-relay-healthcheck

# Metrics, /healthz and /readyz; the relay listens on 127.0.0.1 unless told.
ENV OUTBOX_RELAY_HTTP_LISTEN=0.0.0.0:9187
EXPOSE 9187
USER 10001:10001
# /healthz answers 200 while the process serves HTTP (readiness is /readyz), asked
# where the relay listens: its --http-listen flag, else OUTBOX_RELAY_HTTP_LISTEN
# (deploy/docker/healthcheck.sh; bash's /dev/tcp, no curl in the image).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/outbox-relay-healthcheck"]
ENTRYPOINT ["/usr/local/bin/outbox-relay"]
CMD ["run"]
