-- Build output leaves the event log.
--
-- Until now a build's output was `output` events in build_events: at scale the log was
-- mostly logs, and nothing could ever be removed from it. From now on the log keeps state
-- changes, and output lives here: append-only chunks of lines, keyed by the build, its
-- attempt and the chunk's number within the attempt. Older `output` events stay in the log
-- (it is never changed) and are still shown.

CREATE TABLE build_output (
    build_key   text        NOT NULL,
    attempt     integer     NOT NULL,
    -- 1, 2, 3, ... within the attempt; the key refuses a second writer of the same number.
    seq         integer     NOT NULL,
    -- The build's last event when the chunk was written (read under a share lock of the
    -- build's row, so no event can commit in between): places the chunk among the events
    -- for the progress stream. Chunks of one build are in (attempt, seq) order and in
    -- after_seq order alike.
    after_seq   integer     NOT NULL,
    step        text        NOT NULL,
    -- The chunk's lines joined by newlines (a line never holds one).
    body        text        NOT NULL,
    lines       integer     NOT NULL,
    -- The marker that ends an attempt's output at the cap (worker.output_cap_bytes): its
    -- body says how much was not kept.
    truncated   boolean     NOT NULL DEFAULT false,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (build_key, attempt, seq)
);

-- Chunks are never changed. They are removed only by retention (the janitor), in the same
-- transaction as the `output_pruned` event that says so.
CREATE FUNCTION build_output_refuse_update() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'build_output is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER build_output_append_only
    BEFORE UPDATE ON build_output
    FOR EACH ROW EXECUTE FUNCTION build_output_refuse_update();

-- The fold of `output_pruned` events: the output of attempts 1..output_pruned is gone.
ALTER TABLE builds ADD COLUMN output_pruned integer NOT NULL DEFAULT 0;

-- Output retention looks for finished builds whose output is still kept, oldest first. The
-- index holds only those (a pruned build leaves it), so the scan costs the same however
-- many builds were pruned before.
CREATE INDEX builds_output_kept ON builds (updated_at)
    WHERE output_pruned < attempt
      AND status IN ('succeeded', 'expired', 'failed', 'gave_up', 'cancelled');
