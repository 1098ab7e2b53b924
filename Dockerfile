# GKM: one image with every binary (gkm-agent, gkm-controller, gkm).
# The deploy manifests run the agent and the controller from it with different commands.
#
#   docker build -t gkm:dev .
#
# Builds need no system protoc (the CSI code is generated with a vendored one).

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin gkm --bin gkm-agent -p gkm-controller --bin gkm-controller \
 && mkdir /out \
 && cp target/release/gkm target/release/gkm-agent target/release/gkm-controller /out/

FROM debian:bookworm-slim
# CA certificates for HTTPS registries; util-linux for the mount helpers kubelet expects.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates util-linux \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
# The agent's store and CSI socket live on host paths mounted by the DaemonSet.
VOLUME ["/var/lib/gkm"]
ENTRYPOINT ["/usr/local/bin/gkm-agent"]
