-- Output retention scans one status at a time (each status has its own retention class).
-- With V10's index on `updated_at` alone, a scan for one class walked past every kept build
-- of the other class older than the cutoff (with `succeeded: 0s`, all succeeded builds
-- ever), a cost that grew with the table. Keyed by status first, a scan reads only builds
-- of its status that are due, and stops at its limit.
DROP INDEX builds_output_kept;
CREATE INDEX builds_output_kept ON builds (status, updated_at)
    WHERE output_pruned < attempt
      AND status IN ('succeeded', 'expired', 'failed', 'gave_up', 'cancelled');
