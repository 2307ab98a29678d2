-- The outbox table, with Debezium EventRouter column names: outbox-relay's default
-- mapping works with it unchanged, and so does an existing Debezium outbox table.
--
-- Applications insert one row per event, inside the business transaction:
--
--   INSERT INTO public.outbox_events (aggregatetype, aggregateid, type, payload)
--   VALUES ('order', '42', 'OrderCreated', '{"orderId": 42}');
--
-- becomes a record on topic outbox.event.order, key 42, value {"orderId": 42},
-- headers id (the row's uuid) and type (OrderCreated).
--
-- gen_random_uuid() is built in since PostgreSQL 13.

CREATE TABLE IF NOT EXISTS public.outbox_events (
    id            uuid        PRIMARY KEY DEFAULT gen_random_uuid(), -- header "id": consumers deduplicate by it
    aggregatetype text        NOT NULL,                              -- topic outbox.event.<aggregatetype>
    aggregateid   text        NOT NULL,                              -- record key: same key, same order
    type          text        NOT NULL,                              -- header "type"
    payload       jsonb       NOT NULL,                              -- record value, as PostgreSQL renders it
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- For periodic cleanup (DELETE ... WHERE created_at < ...); see README.md.
CREATE INDEX IF NOT EXISTS outbox_events_created_at_idx ON public.outbox_events (created_at);
