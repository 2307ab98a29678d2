-- The relay's progress record: one row per slot, the position up to which the broker
-- acknowledged everything. A logical slot's confirmed position reaches disk only at
-- checkpoints, so after a PostgreSQL crash (on 16 and older after any restart) it goes
-- back; with this record the relay skips what was already acknowledged instead of
-- sending it again (duplicates bounded to tens of milliseconds of traffic).
--
-- The relay creates the table itself when its role may (CREATE on the schema). With
-- the least-privilege role of 03_relay_role.sql, create it here, as the table owner,
-- and grant the relay what it needs. Put it in the outbox table's schema.

CREATE TABLE IF NOT EXISTS public.outbox_relay_progress (
    slot_name text NOT NULL,
    database text NOT NULL,
    system_identifier text NOT NULL,
    timeline integer NOT NULL,
    acknowledged_lsn pg_lsn NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (slot_name, database)
);

GRANT SELECT, INSERT, UPDATE ON public.outbox_relay_progress TO outbox_relay;
