-- Demo point-of-sale schema, created empty at EVERY site of the compose demo
-- (main, branch1, branch2) on the first start, before `branchsync init`.
--
-- Why this is a correct way to start branches: a branch must start either
-- from a copy of the main's database taken while the main is quiescent, or
-- (as here) with the same schema and no rows at all at any site. Every row
-- is then written after `branchsync init`, captured at the site that wrote
-- it, and reaches the others through the main. Do NOT add INSERTs here: rows
-- loaded at every site by this script would exist once per site, unknown to
-- branchsync, and collide on their keys. For a real ERP, seed the branches
-- from a copy of the main instead (BRANCHSYNC_SEED_FROM, docker/README.md).

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
