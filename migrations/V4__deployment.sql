-- This deployment's id: random, made once per database. Workers label their containers with
-- it, so that clean-ups on a Docker engine shared by several deployments touch only their own.
CREATE TABLE deployment (
    id text PRIMARY KEY
);
INSERT INTO deployment (id) VALUES (md5(random()::text || clock_timestamp()::text));
