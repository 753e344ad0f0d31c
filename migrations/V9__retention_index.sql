-- Artifact retention looks for succeeded builds unused since a cutoff. Without an index it
-- read and sorted every succeeded build (over a second at a million builds, growing with
-- the log); with this one it walks the oldest succeeded builds first and stops at the
-- batch's end. Builds downloaded since the cutoff are skipped (artifact_downloads).
CREATE INDEX builds_succeeded_updated ON builds (updated_at) WHERE status = 'succeeded';
