-- A least-privilege role for the relay: it can log in, open a logical replication
-- connection (REPLICATION: create, stream from and confirm its slot) and read the
-- outbox table. It cannot write anything (but its progress row, sql/04_progress.sql),
-- nor read other tables.
--
-- Replace the placeholder password (or leave it out and set one with \password in
-- psql); give it to the relay via OUTBOX_RELAY_POSTGRES_PASSWORD or
-- --postgres-password-file rather than in the URL.
--
-- Amazon RDS / Aurora: REPLICATION cannot be granted there; instead
--   GRANT rds_replication TO outbox_relay;
--
-- pg_hba.conf: a logical replication connection connects to a database
-- (replication=database), so it is matched by an ordinary line for that database and
-- role; the `replication` keyword in pg_hba.conf is for physical replication only and
-- is not needed. For example:
--   host  app  outbox_relay  10.0.0.0/8  scram-sha-256
-- then SELECT pg_reload_conf();

CREATE ROLE outbox_relay WITH LOGIN REPLICATION PASSWORD 'CHANGE-ME';

GRANT USAGE ON SCHEMA public TO outbox_relay;
GRANT SELECT ON public.outbox_events TO outbox_relay;
