-- The build event log (the source of truth) and the `builds` projection (a read model that
-- is updated in the same transaction as each append and can be rebuilt from the log).

CREATE TABLE build_events (
    -- Global position. Unique, but not commit order: readers of the global log page by
    -- (tx_id, position) below the oldest running transaction instead (see the store's feed).
    position       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- 64 hex digits (cbs_domain::BuildKey). Not a CHECK: Postgres 15 re-reads each CHECK
    -- expression for every statement, and the checks we had cost 14% of the write path
    -- (perf during `bench queue`); only the store writes here, and only BuildKey values.
    build_key      text        NOT NULL,
    -- Per-build sequence number: 1, 2, 3, ... The unique constraint makes a concurrent
    -- writer of the same number fail instead of writing a duplicate.
    seq            integer     NOT NULL,
    event_type     text        NOT NULL,
    schema_version smallint    NOT NULL,
    payload        jsonb       NOT NULL,
    recorded_at    timestamptz NOT NULL,
    -- The writing transaction. Assigned by the database, never by the writer.
    tx_id          xid8        NOT NULL DEFAULT pg_current_xact_id(),
    CONSTRAINT build_events_key_seq UNIQUE (build_key, seq)
);

-- Paging the global log in commit-safe order.
CREATE INDEX build_events_tx_position ON build_events (tx_id, position);

-- The log is append-only: the database itself refuses to change or remove events.
CREATE FUNCTION build_events_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'build_events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER build_events_append_only
    BEFORE UPDATE OR DELETE ON build_events
    FOR EACH ROW EXECUTE FUNCTION build_events_refuse_change();

CREATE TRIGGER build_events_no_truncate
    BEFORE TRUNCATE ON build_events
    FOR EACH STATEMENT EXECUTE FUNCTION build_events_refuse_change();

-- The projection: one row per build, the fold of its events (crates/projections).
CREATE TABLE builds (
    -- The key's format is checked where it first appears, in build_events; every row here
    -- has a `requested` event.
    key              text        PRIMARY KEY,
    -- queued, running, succeeded, failed, cancelled or gave_up (cbs_projections::Status).
    status           text        NOT NULL,
    request          jsonb       NOT NULL,
    attempt          integer     NOT NULL,
    failures         integer     NOT NULL,
    owner            text,
    lease_expires_at timestamptz,
    available_at     timestamptz NOT NULL,
    current_step     text,
    last_error       jsonb,
    artifact         jsonb,
    last_seq         integer     NOT NULL,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL
    -- No CHECK constraints (see build_key above): every row is written from the fold
    -- (cbs_projections::apply), whose invariants the unit tests check, and
    -- `janitor rebuild-projections` compares the table with the fold of the log.
)
-- Every event updates its build's row: leave room on each page so that updates which
-- change no indexed column stay on the page (HOT) and need no index entries.
WITH (fillfactor = 70);

-- The claim: the oldest available queued build. Partial, so it holds only the queue.
CREATE INDEX builds_claimable ON builds (available_at, key) WHERE status = 'queued';
-- Rescue of expired leases.
CREATE INDEX builds_running_lease ON builds (lease_expires_at) WHERE status = 'running';
