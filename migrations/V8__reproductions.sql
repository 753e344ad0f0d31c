-- Reproductions and the module-list index.
--
-- Reproductions: a second, independent build of a succeeded build's request by another
-- worker, compared byte for byte (events reproduction_requested, reproduction_claimed,
-- reproduced). Folded into two columns of the projection:
--   built_by      the worker whose attempt produced the artifact (a reproduction must be
--                 another one);
--   reproduction  the latest reproduction (cbs_projections::Reproduction as JSON).
ALTER TABLE builds ADD COLUMN built_by text;
ALTER TABLE builds ADD COLUMN reproduction jsonb;

-- Builds that succeeded before this migration: the worker of the claim whose attempt
-- succeeded last, as the fold of their log gives it.
UPDATE builds b SET built_by = c.payload->>'worker'
FROM build_events s, build_events c
WHERE s.build_key = b.key AND s.event_type = 'succeeded'
  AND s.seq = (SELECT max(seq) FROM build_events x
               WHERE x.build_key = b.key AND x.event_type = 'succeeded')
  AND c.build_key = b.key AND c.event_type = 'claimed'
  AND c.payload->'attempt' = s.payload->'attempt';

-- The reproduction queue (workers claim from it when the build queue is empty) and the
-- running reproductions (the janitor's rescue): both hold only the few builds in those
-- states.
CREATE INDEX builds_reproduction_queued ON builds (((reproduction->>'requested_at')), key)
    WHERE (reproduction->>'status') = 'queued';
CREATE INDEX builds_reproduction_running ON builds (key)
    WHERE (reproduction->>'status') = 'running';

-- Builds by the module-list hash of their binary (the trusted comment's, recorded in the
-- artifact from now on): `GET /api/artifacts?modules_sha256=` finds the build of the
-- request a binary from elsewhere says it was built from, so that `client verify` can say
-- "this server built that request to other bytes".
CREATE INDEX builds_artifact_modules ON builds ((artifact->>'modules_sha256'))
    WHERE artifact IS NOT NULL;
