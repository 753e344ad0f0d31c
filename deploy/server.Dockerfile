# The caddy-build-server image: the one binary, CA certificates, a non-root user.
#
# The build context holds the release binary as `caddy-build-server` (scripts/images puts it
# there: `cargo build --release -p cbs-roles`), so this file needs no Rust image.
#
#   docker build -f deploy/server.Dockerfile -t caddy-build-server <context with the binary>
#
# Run as `api`, `worker`, `janitor` or `all` (the default). A worker drives the host's Docker
# engine through its socket: give the container the socket and the socket's group
# (`--group-add`), and mount its build and cache directories at the same paths as on the
# host (the build containers it starts are the host's, and mount those host paths).
FROM debian:bookworm-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 cbs \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/cbs --create-home cbs

COPY caddy-build-server /usr/local/bin/caddy-build-server

USER 10001:10001
WORKDIR /var/lib/cbs
# The api; the worker's and janitor's metrics listener (metrics.listen) by convention.
EXPOSE 8234 9235
# GET /healthz on the api's port, or on metrics.listen for a worker or janitor.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["caddy-build-server", "healthcheck"]
ENTRYPOINT ["caddy-build-server"]
CMD ["all"]
