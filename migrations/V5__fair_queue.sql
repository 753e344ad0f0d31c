-- Fair claiming across clients. Each build records who requested it and its rank in the
-- fair queue (both from its `requested` event); workers take queued builds by rank, then by
-- age, so that clients take turns instead of the oldest submissions going first.
-- A constant default: adding the columns rewrites nothing.
ALTER TABLE builds ADD COLUMN client text;
ALTER TABLE builds ADD COLUMN queue_rank bigint NOT NULL DEFAULT 0;

-- The claim (and the queue's lowest rank when a build is requested).
CREATE INDEX builds_fair_claim ON builds (queue_rank, available_at, key) WHERE status = 'queued';
-- A client's queued and running builds: the per-client cap, and its last rank.
CREATE INDEX builds_client_active ON builds (client, queue_rank)
    WHERE status IN ('queued', 'running');
