# syntax=docker/dockerfile:1
# One image for the node DaemonSet (`ztunnel run`, and `ztunnel-cni install` beside it) and
# for the CA (`ztunnel ca`):
#   docker build -t ghcr.io/ztunnel-dev/ztunnel:0.1.0 .
# deploy/base refers to it by that name; override it there with kustomize `images:`.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The daemon and the CA, linked against the runtime image's glibc; the `dist` profile is
# release with whole-program LTO (smaller code, so a smaller idle RSS).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist --locked -p ztunnel \
 && install -D -m 0755 target/dist/ztunnel /out/ztunnel
# The CNI plugin is copied onto the node and run there by the container runtime, on whatever
# glibc the node has: link it statically (the target is explicit so that only the plugin, not
# build scripts or proc macros, is built static).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    triple="$(rustc -vV | sed -n 's/^host: //p')" \
 && RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked -p ztunnel-cni --target "$triple" \
 && install -D -m 0755 "target/$triple/release/ztunnel-cni" /out/ztunnel-cni

FROM debian:bookworm-slim
# nft and ip: the daemon runs them inside each enrolled pod's network namespace.
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables iproute2 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ztunnel /usr/local/bin/ztunnel
COPY --from=build /out/ztunnel-cni /usr/local/bin/ztunnel-cni
# The DaemonSet runs `run` (daemon, as root with a few capabilities) and `ztunnel-cni install`;
# the CA Deployment runs `ca` as a non-root user (set in its pod spec).
ENTRYPOINT ["/usr/local/bin/ztunnel"]
