-- The point-of-sale schema of the demo and the scenarios (schema = "pos"),
-- created empty at EVERY site before `branchsync init`: by the compose stack
-- on each container's first start, by the scenario runner's local target in
-- each throwaway cluster. `branchsync` embeds this file; its rules
-- ([[tables]], products.stock is a counter) are in tables.toml beside it.
--
-- Why this is a correct way to start branches: a branch must start either
-- from a copy of the main's database taken while the main is quiescent, or
-- (as here) with the same schema and no rows at all at any site. Every row
-- is then written after `branchsync init`, captured at the site that wrote
-- it, and reaches the others through the main. Do NOT add INSERTs here: rows
-- loaded at every site by this script would exist once per site, unknown to
-- branchsync, and collide on their keys. For a real ERP, seed the branches
-- from a copy of the main instead (BRANCHSYNC_SEED_FROM, docker/README.md).

-- The shop application's own role, as an ERP has one (Odoo runs as "odoo"):
-- it owns the tables, and the workload and module installs run as it.
-- branchsync replays a schema change as the role that made it, which must
-- not be a superuser (DESIGN R22), so the DDL of the module-install
-- scenario is made as "pos", never as "postgres".
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pos') THEN
        CREATE ROLE pos LOGIN;
    END IF;
END $$;
GRANT CREATE, USAGE ON SCHEMA public TO pos;
SET ROLE pos;

CREATE TABLE products (
    id serial PRIMARY KEY,
    name text NOT NULL,
    price numeric(10,2) NOT NULL,
    stock integer NOT NULL DEFAULT 0,
    CHECK (id >= 0)
);
CREATE TABLE orders (
    id serial PRIMARY KEY,
    shop text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    total numeric(12,2) NOT NULL DEFAULT 0,
    note text
);
CREATE TABLE order_lines (
    id bigserial PRIMARY KEY,
    order_id integer NOT NULL REFERENCES orders(id),
    product_id integer NOT NULL REFERENCES products(id),
    qty integer NOT NULL,
    price numeric(10,2) NOT NULL
);
-- No primary key: branchsync gives it REPLICA IDENTITY FULL.
CREATE TABLE audit_log (
    event text NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    payload jsonb
);
-- Stays local to each site (BRANCHSYNC_EXCLUDE=local_cache in docker-compose.yml).
CREATE TABLE local_cache (k text PRIMARY KEY, v text);

RESET ROLE;
