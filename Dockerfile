# syntax=docker/dockerfile:1
#
# One image for every Flotilla component: the `flotilla` binary, whose first
# argument picks the part (router, broker, mqtt-gateway, lwt, console,
# operator, up). The Kubernetes operator runs this same image for all of them.
#
#   docker build -t ghcr.io/flotilla-dev/flotilla:0.1.0 .
#   docker run --rm -p 5672:5672 ghcr.io/flotilla-dev/flotilla:0.1.0 router --amqp 0.0.0.0:5672
#
# Listeners default to 127.0.0.1, so inside a container give each one a
# 0.0.0.0 address (the operator does this for the pods it makes).

ARG RUST_VERSION=1

# ---- build -----------------------------------------------------------------
# Debian 12 here and in the runtime image, so the glibc the binary was linked
# against is the one it runs with.
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src

# The sources; .dockerignore keeps target/, fuzz/, .git and node_modules out.
COPY . .

# BuildKit cache mounts keep the crate registry and target/ between builds,
# so a source change recompiles Flotilla's crates, not every dependency.
# target/ is a cache mount, so the binary is copied out of it to /out.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p flotilla --bin flotilla \
 && install -D -m 0755 target/release/flotilla /out/usr/local/bin/flotilla \
 && install -d -m 0750 /out/var/lib/flotilla

# ---- runtime ---------------------------------------------------------------
# distroless/cc: glibc, libgcc_s, CA certificates, /etc/passwd with the
# nonroot user (65532), and no shell or package manager.
FROM gcr.io/distroless/cc-debian12:nonroot

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="flotilla" \
      org.opencontainers.image.description="Messaging-as-a-service: AMQP 1.0 router mesh, brokers, MQTT gateway, last-will service, console and Kubernetes operator in one binary" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Flotilla" \
      org.opencontainers.image.source="https://github.com/flotilla-dev/flotilla" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}"

COPY --from=build /out/usr/local/bin/flotilla /usr/local/bin/flotilla
# Default home for --data-dir (journals, wills, the console's store): owned by
# nonroot so it is writable without a volume; mount a volume here to keep it.
COPY --from=build --chown=65532:65532 /out/var/lib/flotilla /var/lib/flotilla
WORKDIR /var/lib/flotilla

# AMQP, AMQPS, inter-router, MQTT, MQTTS, HTTP (console; /metrics, /healthz,
# /readyz elsewhere). Which of them a container listens on depends on its
# subcommand and flags.
EXPOSE 5672 5671 55672 1883 8883 8080

# Numeric, so that Kubernetes' runAsNonRoot can verify it (a user name
# such as "nonroot" cannot be checked without runAsUser). 65532 is nonroot.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/flotilla"]
CMD ["--help"]
