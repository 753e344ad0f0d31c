-- When each build's artifact was last downloaded (at most one write per build and api
-- process per hour). Operational data for artifact retention, not part of the event log:
-- deleting an artifact is recorded there (artifact_deleted).
CREATE TABLE artifact_downloads (
    build_key         text        PRIMARY KEY,
    last_download_at  timestamptz NOT NULL
);
