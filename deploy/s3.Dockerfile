# An S3-compatible server for deploy/compose.yml: moto's server (the one the tests use), with
# the bucket S3_BUCKET created at start. Its objects live in memory: a restart loses them,
# so a real deployment points storage.s3 at a real bucket instead.
#
# The build context's wheels/ holds moto[server] and its dependencies (scripts/images runs
# `pip download` on the host: containers here reach no package index over TLS).
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
COPY wheels /tmp/wheels
RUN python3 -m venv /opt/moto \
 && /opt/moto/bin/pip install -q --no-index --find-links /tmp/wheels "moto[server]==5.1.18" \
 && rm -rf /tmp/wheels
COPY fleet/s3-entrypoint.py /opt/moto/s3-entrypoint.py
USER 10002:10002
EXPOSE 5000
ENTRYPOINT ["/opt/moto/bin/python", "/opt/moto/s3-entrypoint.py"]
