# GKM: one image with every binary (gkm-agent, gkm-controller, gkm).
# The deploy manifests run the agent and the controller from it with different commands.
#
#   docker build -t gkm:dev .
#
# Builds need no system protoc (the CSI code is generated with a vendored one).

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# -p selects the packages the --bin flags look in: gkm (gkm, gkm-agent) and gkm-controller.
RUN cargo build --release --locked -p gkm -p gkm-controller \
      --bin gkm --bin gkm-agent --bin gkm-controller \
 && mkdir /out \
 && cp target/release/gkm target/release/gkm-agent target/release/gkm-controller /out/

# Same Debian release as the builder (glibc). The binaries need only libc at run time:
# mounts are mount(2) through rustix (no util-linux), and libnvidia-ml, loaded at run time,
# is injected by the NVIDIA container toolkit on GPU nodes. CA certificates for HTTPS
# registries.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
# The agent's store and CSI socket live on host paths mounted by the DaemonSet.
VOLUME ["/var/lib/gkm"]
ENTRYPOINT ["/usr/local/bin/gkm-agent"]
