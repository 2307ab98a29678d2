-- outbox_emit: an event without a table row. It writes one transactional logical
-- decoding message (pg_logical_emit_message(true, 'outbox', ...)) that outbox-relay
-- relays exactly like an outbox_events row: delivered once the transaction commits,
-- never if it rolls back, in commit order with the transaction's rows.
--
--   BEGIN;
--   UPDATE orders SET status = 'paid' WHERE id = 42;
--   SELECT outbox_emit('Order', '42', 'OrderPaid', '{"orderId": 42}');
--   COMMIT;
--
-- becomes a record on topic outbox.event.Order, key 42, value {"orderId": 42},
-- headers id and type (OrderPaid), plus one header per member of `headers`.
-- Without `id` the relay derives one from the message's place in the WAL (the same
-- on every replay). The return value is the message's LSN.
--
-- The prefix 'outbox' is the relay's default (--message-prefix); if you change it,
-- change it here too. Nothing is stored in a table: the event lives in the WAL until
-- the relay's slot has passed it (no vacuum, no cleanup, but no table replay either).
--
-- Run it as the owner of the application's schema; callers need EXECUTE on it
-- (granted to PUBLIC by default) and nothing else.

CREATE OR REPLACE FUNCTION public.outbox_emit(
    aggregatetype text,
    aggregateid   text,
    type          text,
    payload       jsonb,
    headers       jsonb DEFAULT '{}',
    id            text  DEFAULT NULL
) RETURNS pg_lsn
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    event jsonb;
    bad   text;
BEGIN
    -- Refuse here what the relay would have to treat as a poison event.
    IF aggregatetype IS NULL OR aggregateid IS NULL OR type IS NULL THEN
        RAISE EXCEPTION 'outbox_emit: aggregatetype, aggregateid and type must not be NULL';
    END IF;
    IF headers IS NULL THEN
        headers := '{}';
    END IF;
    IF jsonb_typeof(headers) <> 'object' THEN
        RAISE EXCEPTION 'outbox_emit: headers must be a JSON object, not %', jsonb_typeof(headers);
    END IF;
    IF headers <> '{}' THEN
        SELECT h.key INTO bad FROM jsonb_each(headers) AS h
         WHERE jsonb_typeof(h.value) <> 'string' LIMIT 1;
        IF bad IS NOT NULL THEN
            RAISE EXCEPTION 'outbox_emit: header % must be a JSON string', bad;
        END IF;
    END IF;
    event := jsonb_build_object(
        'aggregatetype', aggregatetype,
        'aggregateid',   aggregateid,
        'type',          type,
        'payload',       COALESCE(payload, 'null'::jsonb),
        'headers',       headers);
    IF id IS NOT NULL THEN
        event := event || jsonb_build_object('id', id);
    END IF;
    RETURN pg_logical_emit_message(true, 'outbox', event::text);
END
$$;
