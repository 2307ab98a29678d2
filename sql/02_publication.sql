-- The publication the relay streams: the outbox table only, inserts only.
--
-- Run it as the owner of the table (or a superuser): adding a table to a publication
-- takes ownership of the table, and CREATE on the database. The relay creates exactly
-- this publication itself when it is missing and its role may, unless started with
-- --no-create-publication; with the least-privilege role of 03_relay_role.sql it may
-- not, so run this file once.
--
-- For a partitioned outbox table add publish_via_partition_root = true, so rows
-- arrive under the table's name rather than their partition's:
--   ... WITH (publish = 'insert', publish_via_partition_root = true);

CREATE PUBLICATION outbox_relay FOR TABLE public.outbox_events WITH (publish = 'insert');
