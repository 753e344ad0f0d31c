-- The janitor's retry scan: failed builds that may be retried (permanent failures are
-- terminal and accumulate; they are not in this index).
CREATE INDEX builds_retryable ON builds (updated_at)
    WHERE status = 'failed' AND (last_error->>'kind') = 'retryable';
