-- Fair claiming across clients. Each build records who requested it and its rank in the
-- fair queue (both from its `requested` event); workers take queued builds by rank, then by
-- age, so that clients take turns instead of the oldest submissions going first.
-- A constant default: adding the columns rewrites nothing.
ALTER TABLE builds ADD COLUMN client text;
ALTER TABLE builds ADD COLUMN queue_rank bigint NOT NULL DEFAULT 0;

-- The claim (and the queue's lowest rank when a build is requested). It replaces the claim
-- index by age: every status change maintains each partial index on status, so one fewer
-- keeps the write path as short as it was. (The earliest `available_at` of the queue, for
-- idle workers, is read from this index too.)
CREATE INDEX builds_fair_claim ON builds (queue_rank, available_at, key) WHERE status = 'queued';
DROP INDEX builds_claimable;
-- A client's queued and running builds: the per-client cap, and its last rank. Builds the
-- server made itself (no client) are not in it.
CREATE INDEX builds_client_active ON builds (client, queue_rank)
    WHERE status IN ('queued', 'running') AND client IS NOT NULL;
