-- Builds by the SHA-256 of their binary: `GET /api/artifacts/{sha256}` answers "which build
-- made these bytes" (what `caddy-build-server client verify` asks) from an index, whatever
-- the number of builds.
CREATE INDEX builds_artifact_sha256 ON builds ((artifact->>'sha256')) WHERE artifact IS NOT NULL;
