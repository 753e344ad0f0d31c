-- Where each of the janitor's feed-driven duties has read the global event log to
-- (`<tx_id>-<position>`, as the feed's cursor). Operational data, not part of the event log:
-- losing a row only makes the duty read the log again from the start.
CREATE TABLE janitor_cursors (
    name    text PRIMARY KEY,
    cursor  text NOT NULL
);
