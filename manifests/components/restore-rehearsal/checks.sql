-- Each statement must return one row with true, in PITR_REHEARSE_DATABASE
-- (postgres by default). pitr-agent rehearse runs them on the restored copy.
-- The cluster holds at least one application database.
select count(*) > 0 from pg_database where datname not in ('postgres', 'template0', 'template1');
-- For an Odoo database, set PITR_REHEARSE_DATABASE to its name and add e.g.:
--   select count(*) > 0 from res_users;
--   select max(write_date) > now() - interval '2 days' from res_partner;
