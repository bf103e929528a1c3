//! The event triggers `init` installs, and the functions they call.
//!
//! ```text
//!   table_rewrite    ─> remember tables rewritten to fill a new column
//!   sql_drop         ─> was a replicated object dropped? forget its snapshot
//!   ddl_command_end  ─> per command: stripe sequences (R18), add new tables
//!                       to the publication, REPLICA IDENTITY FULL (every
//!                       table), record renames (R20), ship values of new
//!                       non-constant columns; then, once per statement in
//!                       scope: bump schema_version, log it in ddl_log and,
//!                       unless replaying, pg_logical_emit_message('branchsync.ddl')
//! ```
//!
//! # Why it is correct
//!
//! * **In order with the rows.** The message is transactional and written
//!   when the statement ends, so in the WAL it sits after the rows written
//!   before the statement and before the rows written after it (invariant 5).
//!   The trigger numbers its firings per query string (`ordinal`), so capture
//!   can place each statement of a multi-statement string where it ran
//!   ([`super::parse`]).
//! * **Every node, replayed DDL too.** The triggers are `ENABLE ALWAYS`: they
//!   fire under `session_replication_role = replica`, so DDL that apply
//!   replays gets its sequences striped and its replica identity fixed here
//!   as well. Apply sets `branchsync.replaying`: the statement is logged as
//!   replayed and not emitted again (apply writes the author's message
//!   itself, so the main relays it).
//! * **No recursion, nothing node-local in the stream (R19).** The work runs
//!   with `branchsync.internal = on`, which makes every trigger return at
//!   once, so the `ALTER SEQUENCE`/`ALTER TABLE` it runs itself neither
//!   recurses nor reaches the stream. `init` and the daemon's stripe audit
//!   set it too. `ALTER SEQUENCE` is sequence state (restart, increment):
//!   re-striped, never sent.
//! * **Privileges.** The trigger functions run as the role that ran the DDL
//!   and call `SECURITY DEFINER` helpers with a fixed `search_path` for what
//!   needs branchsync's rights (the publication, its own tables, grants to
//!   branchsync's role, the message). The helpers refuse to run outside an
//!   event trigger (`pg_event_trigger_ddl_commands()` raises there), so a
//!   role cannot call them to forge a schema change, and they write no row
//!   of an application table: the rows of `CREATE TABLE AS` and the
//!   author's values of new columns are written by the invoker's function,
//!   as the role that ran the DDL, so that table's triggers never run with
//!   branchsync's rights.
//! * **Settings are believed only from branchsync.** Any session can set
//!   `branchsync.internal` or `branchsync.replaying` itself. They count only
//!   in sessions of branchsync's role or a superuser, or inside the helpers
//!   (`branchsync.trusted`); the per-string statement count
//!   (`branchsync.ddl_key`) is sealed with the mark key, so a count a
//!   session wrote itself starts again at 1; what `sql_drop` and
//!   `table_rewrite` note for `ddl_command_end` (`branchsync.dropped`,
//!   `branchsync.rewritten`) is wiped at `ddl_command_start`.
//!
//! # Rows of `CREATE TABLE AS` and new columns
//!
//! Rows a statement writes *before* its table joins the publication are not
//! decoded. For `CREATE TABLE AS`/`SELECT INTO` the helper moves the rows out
//! and back in after adding the table, so they travel as rows (the receiver
//! replays the statement `WITH NO DATA`). A column added with a default that
//! is not a constant (`now()`, `random()`, `serial`) gets a different value at
//! each site when replayed: the helper rewrites the column's values at the
//! author (`UPDATE … SET c = c`) so the author's values travel as updates.
//! Tables without a primary key cannot be corrected that way (documented).

use tokio_postgres::Transaction;

use crate::scope::Scope;
use crate::EngineError;

/// Every function and trigger, idempotent (`CREATE OR REPLACE`, event
/// triggers created when missing and set `ENABLE ALWAYS`).
pub const TRIGGER_SQL: &str = r#"
GRANT USAGE ON SCHEMA branchsync TO PUBLIC;
DROP FUNCTION IF EXISTS branchsync.fix_table(oid, boolean, boolean, boolean);
DROP FUNCTION IF EXISTS branchsync.on_ddl_end(text, text, text, integer, text, boolean, text);

-- Whether the branchsync.* settings of this session may be believed: only
-- in sessions of branchsync's own role or of a superuser, and inside
-- branchsync's own helpers (cu, the current user, is then their owner). Any
-- other session can set them itself.
CREATE OR REPLACE FUNCTION branchsync.trusted(cu text) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname IN (cu, session_user) AND rolsuper)
        OR EXISTS (SELECT 1 FROM branchsync.daemon_role WHERE rolname = session_user)
$fn$;

CREATE OR REPLACE FUNCTION branchsync.in_scope(nsp text, rel text) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT coalesce((
        SELECT nsp = ANY (s.schemas) AND nsp <> 'branchsync'
           AND NOT EXISTS (SELECT 1 FROM unnest(s.exclude_re) r WHERE rel ~ r OR (nsp || '.' || rel) ~ r)
        FROM branchsync.scope s), false)
$fn$;

CREATE OR REPLACE FUNCTION branchsync.schema_in_scope(nsp text) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT coalesce((SELECT nsp = ANY (s.schemas) AND nsp <> 'branchsync' FROM branchsync.scope s), false)
$fn$;

-- Whether a relation is replicated: tables by the scope, indexes and owned
-- sequences by their table, other relations by their schema.
CREATE OR REPLACE FUNCTION branchsync.rel_in_scope(rel oid) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT CASE
        WHEN c.relpersistence <> 'p' THEN false
        WHEN c.relkind IN ('r', 'p') THEN branchsync.in_scope(n.nspname, c.relname)
        WHEN c.relkind IN ('i', 'I') THEN (SELECT branchsync.rel_in_scope(i.indrelid) FROM pg_index i WHERE i.indexrelid = rel)
        WHEN c.relkind = 'S' AND EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = rel
                                           AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') AND d.refobjsubid > 0)
            THEN (SELECT bool_and(branchsync.in_scope(tn.nspname, t.relname))
                    FROM pg_depend d JOIN pg_class t ON t.oid = d.refobjid JOIN pg_namespace tn ON tn.oid = t.relnamespace
                   WHERE d.classid = 'pg_class'::regclass AND d.objid = rel AND d.refclassid = 'pg_class'::regclass
                     AND d.deptype IN ('a', 'i') AND d.refobjsubid > 0)
        ELSE branchsync.schema_in_scope(n.nspname)
    END
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel
$fn$;

-- Whether DDL on a relation replicates: every persistent relation of a
-- replicated schema, excluded tables too. An excluded table's rows stay
-- local, but its schema follows the main's like every other table's (as
-- join creates it): a module upgrade that changes an ERP's session or cache
-- table must reach every site, whose ERP uses it.
CREATE OR REPLACE FUNCTION branchsync.ddl_in_scope(rel oid) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT c.relpersistence = 'p' AND branchsync.schema_in_scope(n.nspname)
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel
$fn$;

-- Puts one sequence on this node's stripe (see engine::keys): increment =
-- stride, next value ≡ index (mod stride), START on the stripe, above every
-- value handed out or stored in a column that uses it. Sequences of excluded
-- tables and of other schemas are left alone.
CREATE OR REPLACE FUNCTION branchsync.stripe_sequence(seq oid) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    nd record; s record; lv bigint; called boolean; nxt numeric; m numeric := 0; colmax numeric; c record; v numeric; maxv numeric;
BEGIN
    SELECT node_index, stride INTO nd FROM branchsync.node;
    IF NOT FOUND THEN RETURN; END IF;
    SELECT ps.seqincrement, ps.seqcycle, ps.seqstart, ps.seqmax, format_type(ps.seqtypid, NULL) AS typ,
           format('%I.%I', ns.nspname, cl.relname) AS qname, ns.nspname AS nsp
      INTO s
      FROM pg_sequence ps JOIN pg_class cl ON cl.oid = ps.seqrelid JOIN pg_namespace ns ON ns.oid = cl.relnamespace
     WHERE ps.seqrelid = seq;
    IF NOT FOUND OR NOT branchsync.schema_in_scope(s.nsp) THEN RETURN; END IF;
    IF EXISTS (SELECT 1 FROM pg_depend d JOIN pg_class t ON t.oid = d.refobjid JOIN pg_namespace tn ON tn.oid = t.relnamespace
                WHERE d.classid = 'pg_class'::regclass AND d.objid = seq AND d.refclassid = 'pg_class'::regclass
                  AND d.deptype IN ('a', 'i') AND d.refobjsubid > 0 AND NOT branchsync.in_scope(tn.nspname, t.relname)) THEN
        RETURN;
    END IF;
    -- branchsync's role audits the stripe: it reads the sequence.
    FOR c IN SELECT rolname FROM branchsync.daemon_role LOOP
        EXECUTE format('GRANT SELECT ON SEQUENCE %s TO %I', s.qname, c.rolname);
    END LOOP;
    EXECUTE format('SELECT last_value, is_called FROM %s', s.qname) INTO lv, called;
    nxt := CASE WHEN called THEN lv::numeric + s.seqincrement ELSE lv END;
    IF s.seqincrement = nd.stride AND NOT s.seqcycle AND nxt >= 1 AND mod(nxt, nd.stride) = nd.node_index
       AND s.seqstart >= 1 AND mod(s.seqstart, nd.stride) = nd.node_index THEN
        RETURN;
    END IF;
    -- ALTER SEQUENCE takes a lock that waits for and then blocks nextval:
    -- values handed out before it are at most the last_value read after it.
    EXECUTE format('ALTER SEQUENCE %s NO CYCLE', s.qname);
    EXECUTE format('SELECT last_value, is_called FROM %s', s.qname) INTO lv, called;
    IF called THEN m := lv; END IF;
    FOR c IN
        SELECT tn.nspname, t.relname, a.attname
          FROM pg_depend d JOIN pg_class t ON t.oid = d.refobjid JOIN pg_namespace tn ON tn.oid = t.relnamespace
          JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
         WHERE d.classid = 'pg_class'::regclass AND d.objid = seq AND d.refclassid = 'pg_class'::regclass
           AND d.deptype IN ('a', 'i') AND d.refobjsubid > 0 AND NOT a.attisdropped
           AND a.atttypid IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype, 'numeric'::regtype)
        UNION
        SELECT tn.nspname, t.relname, a.attname
          FROM pg_depend d JOIN pg_attrdef ad ON ad.oid = d.objid JOIN pg_class t ON t.oid = ad.adrelid
          JOIN pg_namespace tn ON tn.oid = t.relnamespace JOIN pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum
         WHERE d.classid = 'pg_attrdef'::regclass AND d.refclassid = 'pg_class'::regclass AND d.refobjid = seq
           AND t.relkind IN ('r', 'p') AND NOT a.attisdropped
           AND a.atttypid IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype, 'numeric'::regtype)
    LOOP
        EXECUTE format('SELECT ceil(max(%I))::numeric FROM %I.%I', c.attname, c.nspname, c.relname) INTO colmax;
        m := greatest(m, coalesce(colmax, 0));
    END LOOP;
    v := greatest(m, 0) + 1;
    v := v + mod(nd.node_index - mod(v, nd.stride) + nd.stride, nd.stride);
    maxv := CASE WHEN s.seqincrement > 0 THEN s.seqmax
                 WHEN s.typ = 'smallint' THEN 32767 WHEN s.typ = 'integer' THEN 2147483647 ELSE 9223372036854775807 END;
    IF v > maxv THEN
        RAISE EXCEPTION 'sequence % cannot be striped: no value on stripe % mod % above the values in use fits below its maximum %',
            s.qname, nd.node_index, nd.stride, maxv
            USING DETAIL = 'branchsync keeps the ids of every node apart; this sequence is close to its maximum.',
                  HINT = format('Widen it (ALTER SEQUENCE %s AS bigint NO MAXVALUE) and the columns that use it.', s.qname);
    END IF;
    EXECUTE format('ALTER SEQUENCE %s INCREMENT BY %s MINVALUE 1 %s START WITH %s RESTART WITH %s NO CYCLE',
                   s.qname, nd.stride, CASE WHEN s.seqincrement < 0 THEN 'NO MAXVALUE' ELSE '' END, v, v);
END
$fn$;

-- A table touched by DDL: publication, replica identity, renames, snapshot,
-- rows of CREATE TABLE AS, values of new non-constant columns. Returns
-- whether the table is replicated.
-- Returns the statement the caller runs as the role that ran the DDL (never
-- here, with branchsync's rights: a table's triggers would run with them)
-- when the author's values of new columns must travel, else NULL.
CREATE OR REPLACE FUNCTION branchsync.fix_table(rel oid, rewritten boolean, replaying boolean) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    t record; q text; has_pk boolean; col text; fresh boolean := false; seq record; dr record; fixup text;
BEGIN
    SELECT c.relname, n.nspname, c.relkind, c.relpersistence, c.relreplident, o.rolname AS owner, o.rolsuper AS owner_super INTO t
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_roles o ON o.oid = c.relowner WHERE c.oid = rel;
    IF NOT FOUND OR t.relkind NOT IN ('r', 'p') OR t.relpersistence <> 'p' OR NOT branchsync.in_scope(t.nspname, t.relname) THEN
        RETURN NULL;
    END IF;
    q := format('%I.%I', t.nspname, t.relname);
    -- branchsync's role applies its rows, and replays its DDL as its owner.
    FOR dr IN SELECT rolname FROM branchsync.daemon_role WHERE rolname <> t.owner LOOP
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON %s TO %I', q, dr.rolname);
        IF NOT t.owner_super AND NOT pg_has_role(dr.rolname, t.owner, 'MEMBER') THEN
            EXECUTE format('GRANT %I TO %I', t.owner, dr.rolname);
        END IF;
    END LOOP;
    IF NOT EXISTS (SELECT 1 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
                    WHERE p.pubname = 'branchsync' AND pr.prrelid = rel) THEN
        EXECUTE format('ALTER PUBLICATION branchsync ADD TABLE %s', q);
    END IF;
    has_pk := EXISTS (SELECT 1 FROM pg_index WHERE indrelid = rel AND indisprimary);
    -- Every change carries the row as its author saw it (R11, R12, R16).
    IF t.relreplident <> 'f' THEN
        EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', q);
    END IF;
    -- Renames (R20), against the snapshot.
    INSERT INTO branchsync.table_renames (old_schema, old_name, new_schema, new_name)
        SELECT k.schema_name, k.table_name, t.nspname, t.relname FROM branchsync.known_tables k
         WHERE k.relid = rel AND (k.schema_name, k.table_name) IS DISTINCT FROM (t.nspname::text, t.relname::text);
    INSERT INTO branchsync.column_renames (schema_name, table_name, old_name, new_name)
        SELECT t.nspname, t.relname, k.attname, a.attname
          FROM branchsync.known_columns k JOIN pg_attribute a ON a.attrelid = k.relid AND a.attnum = k.attnum
         WHERE k.relid = rel AND NOT a.attisdropped AND a.attname::text <> k.attname;
    -- New columns whose default is not a constant: each site would compute
    -- its own values when replaying; ship the author's.
    IF NOT replaying AND has_pk AND EXISTS (SELECT 1 FROM branchsync.known_tables WHERE relid = rel) THEN
        fresh := rewritten OR EXISTS (
            SELECT 1 FROM pg_attribute a JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
             WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
               AND NOT EXISTS (SELECT 1 FROM branchsync.known_columns k WHERE k.relid = rel AND k.attnum = a.attnum)
               AND ad.adbin NOT LIKE '{CONST %');
    END IF;
    DELETE FROM branchsync.known_tables WHERE relid = rel;
    DELETE FROM branchsync.known_columns WHERE relid = rel;
    INSERT INTO branchsync.known_tables VALUES (rel, t.nspname, t.relname);
    INSERT INTO branchsync.known_columns SELECT rel, attnum, attname FROM pg_attribute WHERE attrelid = rel AND attnum > 0 AND NOT attisdropped;
    IF fresh THEN
        SELECT quote_ident(attname) INTO col FROM pg_attribute
         WHERE attrelid = rel AND attnum > 0 AND NOT attisdropped AND attgenerated = '' AND attidentity <> 'a' ORDER BY attnum LIMIT 1;
        IF col IS NOT NULL THEN
            fixup := format('UPDATE %s SET %s = %s', q, col, col);
        END IF;
    END IF;
    -- Sequences it owns (serial, identity), new or not.
    FOR seq IN SELECT d.objid FROM pg_depend d
                WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass AND d.refobjid = rel AND d.deptype IN ('a', 'i') LOOP
        PERFORM branchsync.stripe_sequence(seq.objid);
    END LOOP;
    RETURN fixup;
END
$fn$;

-- ddl_command_end, with branchsync's rights. Does the per-command work and,
-- when the statement touched the scope, logs and emits it.
CREATE OR REPLACE FUNCTION branchsync.on_ddl_end(role text, tag text, path text, dropped boolean, rewritten text)
RETURNS text[]
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    r record; hit boolean := dropped; kind "char"; tbl oid; body text; k record; seal bytea; fixups text[] := '{}'; fixup text;
    replaying boolean := branchsync.trusted(session_user::text) AND coalesce(current_setting('branchsync.replaying', true), '') = 'on';
    rew oid[] := coalesce(string_to_array(nullif(rewritten, ''), ',')::oid[], '{}');
    stmt_key text; prev text; ordinal integer := 1; key_seal text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM branchsync.node) THEN RETURN fixups; END IF;
    -- Firings are numbered per query string (statement_timestamp() is the
    -- same for every statement of one string), across its transactions. The
    -- count is kept in a session setting sealed with the mark key: a count
    -- the session set itself is not believed.
    SELECT k_ipad, k_opad INTO k FROM branchsync.mark_key;
    stmt_key := statement_timestamp()::text || '/' || md5(current_query());
    prev := coalesce(current_setting('branchsync.ddl_key', true), '');
    IF split_part(prev, '#', 1) = stmt_key AND split_part(prev, '#', 2) ~ '^[0-9]{1,9}$'
       AND (k IS NULL OR split_part(prev, '#', 3) = encode(sha256(k.k_opad || sha256(k.k_ipad || convert_to(split_part(prev, '#', 1) || '#' || split_part(prev, '#', 2), 'UTF8'))), 'hex')) THEN
        ordinal := split_part(prev, '#', 2)::integer + 1;
    END IF;
    key_seal := CASE WHEN k IS NULL THEN '' ELSE encode(sha256(k.k_opad || sha256(k.k_ipad || convert_to(stmt_key || '#' || ordinal, 'UTF8'))), 'hex') END;
    PERFORM set_config('branchsync.ddl_key', stmt_key || '#' || ordinal || '#' || key_seal, false);
    -- Until the end of this function: the DDL it runs itself fires no trigger
    -- work (R19). Set back explicitly, so later statements of the same
    -- transaction are seen.
    PERFORM set_config('branchsync.internal', 'on', true);
    -- Pass 1: did the statement touch the scope? Then the message goes first,
    -- before any row the fix-ups below write (CREATE TABLE AS, new columns).
    FOR r IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
        IF r.in_extension OR r.schema_name IS NULL OR r.schema_name LIKE 'pg\_temp%' THEN CONTINUE; END IF;
        IF r.classid = 'pg_class'::regclass THEN
            hit := hit OR coalesce(branchsync.ddl_in_scope(r.objid), false);
        ELSIF r.classid = 'pg_constraint'::regclass THEN
            SELECT nullif(conrelid, 0) INTO tbl FROM pg_constraint WHERE oid = r.objid;
            hit := hit OR CASE WHEN tbl IS NULL THEN branchsync.schema_in_scope(r.schema_name) ELSE coalesce(branchsync.ddl_in_scope(tbl), false) END;
        ELSE
            hit := hit OR branchsync.schema_in_scope(r.schema_name);
        END IF;
    END LOOP;
    -- Sequence state is node-local: re-striped below, never sent.
    IF hit AND tag <> 'ALTER SEQUENCE' THEN
        UPDATE branchsync.schema_version SET n = n + 1;
        INSERT INTO branchsync.ddl_log (role, tag, query, replayed) VALUES (role, tag, left(current_query(), 20000), replaying);
        IF NOT replaying THEN
            -- Sealed with the DDL mark key, bound to this transaction (R25):
            -- capture counts a branchsync.ddl message only with a seal that holds.
            body := json_build_object('query', current_query(), 'search_path', path, 'role', role, 'tag', tag, 'ordinal', ordinal, 'key', stmt_key)::text;
            SELECT k_ipad, k_opad INTO k FROM branchsync.mark_key;
            IF FOUND THEN
                seal := sha256(k.k_opad || sha256(k.k_ipad || convert_to('branchsync.ddl', 'UTF8') || '\x00'::bytea
                    || convert_to((pg_current_xact_id()::text::int8 % 4294967296)::text, 'UTF8') || '\x00'::bytea || convert_to(body, 'UTF8')));
                PERFORM pg_logical_emit_message(true, 'branchsync.ddl', body || E'\n' || encode(seal, 'hex'));
            ELSE
                PERFORM pg_logical_emit_message(true, 'branchsync.ddl', body);
            END IF;
        END IF;
    END IF;
    -- Pass 2: the fix-ups, at every node.
    FOR r IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
        IF r.in_extension OR r.schema_name IS NULL OR r.schema_name LIKE 'pg\_temp%' THEN CONTINUE; END IF;
        IF r.classid = 'pg_class'::regclass THEN
            SELECT relkind INTO kind FROM pg_class WHERE oid = r.objid;
            IF kind IN ('r', 'p') THEN
                fixup := branchsync.fix_table(r.objid, r.objid = ANY (rew), replaying);
                IF fixup IS NOT NULL THEN fixups := fixups || fixup; END IF;
            ELSIF kind = 'S' THEN
                PERFORM branchsync.stripe_sequence(r.objid);
            END IF;
        ELSIF r.classid = 'pg_constraint'::regclass THEN
            SELECT nullif(conrelid, 0) INTO tbl FROM pg_constraint WHERE oid = r.objid;
            IF tbl IS NOT NULL THEN
                fixup := branchsync.fix_table(tbl, false, replaying);
                IF fixup IS NOT NULL THEN fixups := fixups || fixup; END IF;
            END IF;
        END IF;
    END LOOP;
    PERFORM set_config('branchsync.internal', 'off', true);
    RETURN fixups;
END
$fn$;

-- sql_drop, with branchsync's rights: forgets the snapshot of dropped tables
-- and columns; true when a replicated object was dropped.
CREATE OR REPLACE FUNCTION branchsync.on_drop() RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    o record; hit boolean := false;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM branchsync.node) THEN RETURN false; END IF;
    FOR o IN SELECT * FROM pg_event_trigger_dropped_objects() LOOP
        IF o.object_type = 'table' THEN
            DELETE FROM branchsync.known_tables WHERE relid = o.objid;
            DELETE FROM branchsync.known_columns WHERE relid = o.objid;
        ELSIF o.object_type = 'table column' THEN
            DELETE FROM branchsync.known_columns WHERE relid = o.objid AND attnum = o.objsubid;
        END IF;
        IF NOT o.original OR o.is_temporary OR o.schema_name IS NULL THEN CONTINUE; END IF;
        -- Excluded tables too (their schema follows the main's: ddl_in_scope).
        hit := hit OR branchsync.schema_in_scope(o.schema_name);
    END LOOP;
    RETURN hit;
END
$fn$;

-- The trigger functions run as the role that ran the DDL, and so does
-- every row they write to an application table (the rows of CREATE TABLE
-- AS, the author's values of new columns): branchsync's helpers write none.
CREATE OR REPLACE FUNCTION branchsync.ddl_command_end() RETURNS event_trigger LANGUAGE plpgsql AS $fn$
DECLARE
    r record; js jsonb; i integer; stmt text; fixups text[];
    ctas_q text[] := '{}'; ctas_rows jsonb[] := '{}';
    trusted boolean := branchsync.trusted(current_user::text);
BEGIN
    IF trusted AND coalesce(current_setting('branchsync.internal', true), '') = 'on' THEN RETURN; END IF;
    -- Rows CREATE TABLE AS wrote before its table joins the publication are
    -- not decoded: out now, back in once it has joined.
    IF tg_tag IN ('CREATE TABLE AS', 'SELECT INTO') AND NOT (trusted AND coalesce(current_setting('branchsync.replaying', true), '') = 'on') THEN
        FOR r IN SELECT format('%I.%I', n.nspname, c.relname) AS q
                   FROM pg_event_trigger_ddl_commands() d JOIN pg_class c ON c.oid = d.objid JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE d.classid = 'pg_class'::regclass AND NOT d.in_extension AND c.relkind IN ('r', 'p') AND c.relpersistence = 'p'
                    AND branchsync.in_scope(n.nspname, c.relname) LOOP
            EXECUTE format('SELECT coalesce(jsonb_agg(t), ''[]'') FROM %s t', r.q) INTO js;
            EXECUTE format('TRUNCATE %s', r.q);
            ctas_q := ctas_q || r.q;
            ctas_rows := ctas_rows || js;
        END LOOP;
    END IF;
    fixups := branchsync.on_ddl_end(current_user::text, tg_tag, current_setting('search_path'),
        coalesce(current_setting('branchsync.dropped', true), '') = 'on', coalesce(current_setting('branchsync.rewritten', true), ''));
    FOR i IN 1 .. coalesce(array_length(ctas_q, 1), 0) LOOP
        EXECUTE format('INSERT INTO %s SELECT * FROM jsonb_populate_recordset(NULL::%s, $1)', ctas_q[i], ctas_q[i]) USING ctas_rows[i];
    END LOOP;
    FOREACH stmt IN ARRAY coalesce(fixups, '{}') LOOP
        EXECUTE stmt;
    END LOOP;
    PERFORM set_config('branchsync.dropped', '', true);
    PERFORM set_config('branchsync.rewritten', '', true);
END
$fn$;

CREATE OR REPLACE FUNCTION branchsync.sql_drop() RETURNS event_trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF branchsync.trusted(current_user::text) AND coalesce(current_setting('branchsync.internal', true), '') = 'on' THEN RETURN; END IF;
    IF branchsync.on_drop() THEN
        PERFORM set_config('branchsync.dropped', 'on', true);
    END IF;
END
$fn$;

-- What sql_drop and table_rewrite note for ddl_command_end holds for one
-- command: wiped when it starts, so a value a session set beforehand never
-- counts.
CREATE OR REPLACE FUNCTION branchsync.ddl_command_start() RETURNS event_trigger LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM set_config('branchsync.dropped', '', true);
    PERFORM set_config('branchsync.rewritten', '', true);
END
$fn$;

CREATE OR REPLACE FUNCTION branchsync.table_rewrite() RETURNS event_trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF branchsync.trusted(current_user::text) AND coalesce(current_setting('branchsync.internal', true), '') = 'on' THEN RETURN; END IF;
    -- 2 = AT_REWRITE_DEFAULT_VAL: a column added with a volatile default.
    IF (pg_event_trigger_table_rewrite_reason() & 2) <> 0 THEN
        PERFORM set_config('branchsync.rewritten',
            concat_ws(',', nullif(current_setting('branchsync.rewritten', true), ''), pg_event_trigger_table_rewrite_oid()::text), true);
    END IF;
END
$fn$;

REVOKE ALL ON FUNCTION branchsync.stripe_sequence(oid) FROM PUBLIC;
REVOKE ALL ON FUNCTION branchsync.fix_table(oid, boolean, boolean) FROM PUBLIC;

DO $do$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'branchsync_ddl_end') THEN
        CREATE EVENT TRIGGER branchsync_ddl_end ON ddl_command_end EXECUTE FUNCTION branchsync.ddl_command_end();
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'branchsync_sql_drop') THEN
        CREATE EVENT TRIGGER branchsync_sql_drop ON sql_drop EXECUTE FUNCTION branchsync.sql_drop();
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'branchsync_ddl_start') THEN
        CREATE EVENT TRIGGER branchsync_ddl_start ON ddl_command_start EXECUTE FUNCTION branchsync.ddl_command_start();
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'branchsync_table_rewrite') THEN
        CREATE EVENT TRIGGER branchsync_table_rewrite ON table_rewrite EXECUTE FUNCTION branchsync.table_rewrite();
    END IF;
END
$do$;
ALTER EVENT TRIGGER branchsync_ddl_end ENABLE ALWAYS;
ALTER EVENT TRIGGER branchsync_sql_drop ENABLE ALWAYS;
ALTER EVENT TRIGGER branchsync_table_rewrite ENABLE ALWAYS;
ALTER EVENT TRIGGER branchsync_ddl_start ENABLE ALWAYS;
"#;

/// Session setting that makes every branchsync trigger return at once: set by
/// the triggers' own work, by `init` and by the stripe audit.
pub const INTERNAL_GUC: &str = "branchsync.internal";

/// A shell glob (as [`Scope`] matches it) as an anchored POSIX regular
/// expression for the triggers: `*` any text, `?` one character, `[…]` and
/// `[!…]` classes; everything else literal.
pub fn glob_to_regex(glob: &str) -> String {
    let mut out = String::from("^");
    let mut chars = glob.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' => out.push_str(".*"),
            '?' => out.push('.'),
            '[' => {
                let mut class = String::new();
                let mut closed = false;
                if chars.peek() == Some(&'!') {
                    chars.next();
                    class.push('^');
                }
                for d in chars.by_ref() {
                    if d == ']' && !(class.is_empty() || class == "^") {
                        closed = true;
                        break;
                    }
                    if d == '\\' || d == '[' {
                        class.push('\\');
                    }
                    class.push(d);
                }
                if closed {
                    out.push('[');
                    out.push_str(&class);
                    out.push(']');
                } else {
                    out.push_str("\\[");
                    out.push_str(&regex_escape(&class));
                }
            }
            other => out.push_str(&regex_escape(&other.to_string())),
        }
    }
    out.push('$');
    out
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Installs or refreshes the triggers, the scope they consult and the
/// snapshot renames are detected against, inside `init`'s transaction (which
/// has set [`INTERNAL_GUC`]).
pub async fn install(tx: &Transaction<'_>, scope: &Scope) -> Result<(), EngineError> {
    tx.batch_execute(TRIGGER_SQL).await.map_err(EngineError::pg("installing the DDL event triggers"))?;
    let res: Vec<String> = scope.exclude_globs().iter().map(|g| glob_to_regex(g)).collect();
    tx.execute(
        "INSERT INTO branchsync.scope (schemas, exclude_globs, exclude_re) VALUES ($1, $2, $3) \
         ON CONFLICT (singleton) DO UPDATE SET schemas = excluded.schemas, exclude_globs = excluded.exclude_globs, exclude_re = excluded.exclude_re",
        &[&scope.schemas().to_vec(), &scope.exclude_globs().to_vec(), &res],
    )
    .await
    .map_err(EngineError::pg("recording the replicated scope"))?;
    // Object ids change when a database is copied with pg_dump: rebuild the
    // snapshot of every replicated table from the catalog.
    tx.batch_execute(
        "DELETE FROM branchsync.known_columns; DELETE FROM branchsync.known_tables;
         INSERT INTO branchsync.known_tables
             SELECT c.oid, n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind IN ('r', 'p') AND c.relpersistence = 'p' AND branchsync.in_scope(n.nspname, c.relname);
         INSERT INTO branchsync.known_columns
             SELECT a.attrelid, a.attnum, a.attname FROM pg_attribute a JOIN branchsync.known_tables k ON k.relid = a.attrelid
              WHERE a.attnum > 0 AND NOT a.attisdropped;",
    )
    .await
    .map_err(EngineError::pg("recording the replicated tables' columns"))?;
    Ok(())
}

/// The scope `init` recorded: `(schemas, exclude globs)`; `None` before the
/// first `init` with DDL replication.
pub async fn recorded_scope(client: &tokio_postgres::Client) -> Result<Option<(Vec<String>, Vec<String>)>, EngineError> {
    let row = client
        .query_opt("SELECT schemas, exclude_globs FROM branchsync.scope", &[])
        .await
        .map_err(EngineError::pg("reading the recorded scope"))?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_become_anchored_regexes_that_match_like_the_scope() {
        assert_eq!(glob_to_regex("ir_session*"), "^ir_session.*$");
        assert_eq!(glob_to_regex("public.ir_cache"), "^public\\.ir_cache$");
        assert_eq!(glob_to_regex("t?[!ab]x[0-9]"), "^t.[^ab]x[0-9]$");
        assert_eq!(glob_to_regex("a[b"), "^a\\[b$");
        assert_eq!(glob_to_regex("a+b(c)"), "^a\\+b\\(c\\)$");
    }
}

#[cfg(test)]
mod pg_tests {
    //! The triggers at one node, observed through a `test_decoding` slot: what
    //! reaches the WAL stream, in which order, and what stays node-local.
    use tokio_postgres::Client;

    use crate::scope::Scope;
    use crate::setup::{init, InitParams};
    use crate::test_utils::PgCluster;
    use crate::Role;

    const SCHEMA: &str = "
        CREATE ROLE erp LOGIN;
        GRANT CREATE ON SCHEMA public TO erp;
        SET ROLE erp;
        CREATE TABLE orders (id serial PRIMARY KEY, shop text NOT NULL, note text);
        CREATE TABLE local_cache (id serial PRIMARY KEY, v text);
        INSERT INTO orders (shop) SELECT 'main' FROM generate_series(1, 3);
        RESET ROLE;";

    /// A node (index 3 of stride 100) after `init`, with a `test_decoding`
    /// slot that shows what the triggers write to the WAL from now on.
    async fn node() -> (PgCluster, Client, Client) {
        let pg = PgCluster::start();
        let mut admin = pg.connect().await;
        admin.batch_execute(SCHEMA).await.unwrap();
        let p = InitParams { node: "b3".into(), index: 3, role: Role::Branch, stride: 100, scope: Scope::new(&["public".into()], &["local_*".into()]).unwrap() };
        init(&mut admin, &p).await.unwrap();
        admin.batch_execute("SELECT pg_create_logical_replication_slot('peek', 'test_decoding')").await.unwrap();
        let erp = pg.connect().await;
        erp.batch_execute("SET ROLE erp").await.unwrap();
        (pg, admin, erp)
    }

    /// DDL messages (content JSON) and table changes, in WAL order, since
    /// the last call. Every DDL message must carry a seal that holds for the
    /// node's DDL mark key and its transaction (R25): SQL's HMAC is the
    /// engine's.
    async fn stream(admin: &Client) -> Vec<String> {
        let key: Vec<u8> = admin.query_one("SELECT key FROM branchsync.mark_key", &[]).await.unwrap().get(0);
        let mut xid = 0u32;
        let mut out = Vec::new();
        for r in admin.query("SELECT data FROM pg_logical_slot_get_changes('peek', NULL, NULL)", &[]).await.unwrap() {
            let d: String = r.get(0);
            if let Some(x) = d.strip_prefix("BEGIN ") {
                xid = x.trim().parse().unwrap();
                continue;
            }
            if !(d.starts_with("message") || (d.starts_with("table ") && !d.starts_with("table branchsync."))) {
                continue;
            }
            out.push(match d.find("content:") {
                Some(i) => {
                    let content = &d[i + "content:".len()..];
                    let body = crate::marks::open_text(&key, crate::ddl::DDL_MESSAGE_PREFIX, xid, content.as_bytes())
                        .unwrap_or_else(|| panic!("the DDL message of transaction {xid} is not sealed with the node's key: {content}"));
                    String::from_utf8(body.to_vec()).unwrap()
                }
                None => d.split(':').take(2).collect::<Vec<_>>().join(":"),
            });
        }
        out
    }

    fn ddl(v: &str) -> serde_json::Value {
        serde_json::from_str(v).unwrap_or_else(|e| panic!("not a DDL message: {v}: {e}"))
    }

    async fn seq(c: &Client, name: &str) -> (i64, i64, i64) {
        let r = c.query_one("SELECT increment_by, start_value, coalesce(last_value, start_value) FROM pg_sequences WHERE sequencename = $1", &[&name]).await.unwrap();
        (r.get(0), r.get(1), r.get(2))
    }

    async fn one<T: for<'a> tokio_postgres::types::FromSql<'a>>(c: &Client, sql: &str) -> T {
        c.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
    }

    #[tokio::test]
    async fn each_statement_of_a_string_is_emitted_once_where_it_ran() {
        let (_pg, admin, erp) = node().await;
        erp.batch_execute(
            "CREATE TABLE promo (id serial PRIMARY KEY, name text NOT NULL);
             INSERT INTO promo (name) VALUES ('a');
             ALTER TABLE promo ADD COLUMN pct integer DEFAULT 5;
             INSERT INTO promo (name) VALUES ('b');",
        )
        .await
        .unwrap();
        let s = stream(&admin).await;
        assert_eq!(s.len(), 4, "{s:#?}");
        let (first, second) = (ddl(&s[0]), ddl(&s[2]));
        assert_eq!((first["ordinal"].as_i64(), first["tag"].as_str()), (Some(1), Some("CREATE TABLE")));
        assert_eq!((second["ordinal"].as_i64(), second["tag"].as_str()), (Some(2), Some("ALTER TABLE")));
        assert_eq!(first["key"], second["key"], "one query string");
        assert_eq!(first["role"], "erp");
        assert!(first["search_path"].as_str().unwrap().contains("public"));
        assert!(s[1].starts_with("table public.promo") && s[3].starts_with("table public.promo"), "rows of the new table are decoded: {s:#?}");
        // New sequences are on the stripe at once; the table is published.
        assert_eq!(seq(&admin, "promo_id_seq").await.0, 100);
        let ids: Vec<i32> = erp.query("SELECT id FROM promo ORDER BY id", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
        assert_eq!(ids[1], 103, "the second row already took a striped id: {ids:?}");
        assert_eq!(one::<i64>(&admin, "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'branchsync' AND tablename = 'promo'").await, 1);
        assert_eq!(one::<i64>(&admin, "SELECT count(*) FROM branchsync.ddl_log WHERE NOT replayed").await, 2);

        // The same statement text again, in a new string: a new key.
        erp.batch_execute("CREATE INDEX promo_name ON promo (name)").await.unwrap();
        let s = stream(&admin).await;
        assert_eq!(s.len(), 1);
        assert_ne!(ddl(&s[0])["key"], first["key"]);
    }

    #[tokio::test]
    async fn keyless_tables_get_full_identity_excluded_ones_keep_their_rows_local_and_temporary_objects_stay_local() {
        let (_pg, admin, erp) = node().await;
        erp.batch_execute("CREATE TABLE audit (event text, at timestamptz)").await.unwrap();
        assert_eq!(one::<String>(&admin, "SELECT relreplident::text FROM pg_class WHERE relname = 'audit'").await, "f");
        erp.batch_execute(
            "CREATE TABLE local_tmp (id serial PRIMARY KEY); CREATE TEMP TABLE scratch (x int); DROP TABLE local_cache; ALTER TABLE local_tmp ADD COLUMN v text;",
        )
        .await
        .unwrap();
        assert_eq!(seq(&admin, "local_tmp_id_seq").await.0, 1, "an excluded table's sequence is not striped");
        assert_eq!(one::<i64>(&admin, "SELECT count(*) FROM pg_publication_tables WHERE tablename LIKE 'local_%'").await, 0);
        let s = stream(&admin).await;
        // The excluded tables' schema follows (their rows stay local); the
        // temporary table's does not.
        let tags: Vec<String> = s.iter().map(|m| ddl(m)["tag"].as_str().unwrap_or_default().to_string()).collect();
        assert_eq!(tags, ["CREATE TABLE", "CREATE TABLE", "DROP TABLE", "ALTER TABLE"], "audit, then local_tmp and local_cache, not scratch: {s:#?}");
        erp.batch_execute("DROP TABLE audit").await.unwrap();
        let s = stream(&admin).await;
        assert_eq!(s.len(), 1);
        assert_eq!(ddl(&s[0])["tag"], "DROP TABLE");
    }

    #[tokio::test]
    async fn r18_sequence_restarts_and_truncate_restart_identity_stay_on_the_stripe() {
        let (_pg, admin, erp) = node().await;
        assert_eq!(seq(&admin, "orders_id_seq").await, (100, 103, 103));
        // The ERP restarts its sequence below the rows it has: re-striped
        // above them, node-local (nothing in the stream).
        erp.batch_execute("ALTER SEQUENCE orders_id_seq RESTART WITH 1").await.unwrap();
        assert_eq!(seq(&admin, "orders_id_seq").await, (100, 103, 103));
        erp.batch_execute("ALTER SEQUENCE orders_id_seq INCREMENT BY 1").await.unwrap();
        assert_eq!(seq(&admin, "orders_id_seq").await.0, 100);
        let id: i32 = erp.query_one("INSERT INTO orders (shop) VALUES ('x') RETURNING id", &[]).await.unwrap().get(0);
        assert_eq!(id, 103);
        // A sequence created on its own, and one with a cycle.
        erp.batch_execute("CREATE SEQUENCE ticket_seq CYCLE MAXVALUE 1000000").await.unwrap();
        let t: i64 = erp.query_one("SELECT nextval('ticket_seq')", &[]).await.unwrap().get(0);
        assert_eq!(t, 3);
        // TRUNCATE … RESTART IDENTITY goes back to START, which is on the stripe.
        erp.batch_execute("INSERT INTO orders (shop) SELECT 'y' FROM generate_series(1, 5); TRUNCATE orders RESTART IDENTITY").await.unwrap();
        let id: i32 = erp.query_one("INSERT INTO orders (shop) VALUES ('z') RETURNING id", &[]).await.unwrap().get(0);
        assert_eq!(id % 100, 3, "{id}");
        let s = stream(&admin).await;
        assert!(s.iter().filter(|m| m.starts_with('{')).all(|m| ddl(m)["tag"] == "CREATE SEQUENCE"), "sequence state is not sent: {s:#?}");
    }

    #[tokio::test]
    async fn r20_renames_are_recorded_at_the_node_that_ran_them() {
        let (_pg, admin, erp) = node().await;
        erp.batch_execute("ALTER TABLE orders RENAME COLUMN note TO customer_note; ALTER TABLE orders RENAME TO sale_order").await.unwrap();
        let cols: Vec<(String, String, String)> = admin
            .query("SELECT table_name, old_name, new_name FROM branchsync.column_renames ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        assert_eq!(cols, [("orders".into(), "note".into(), "customer_note".into())]);
        let tables: Vec<(String, String)> =
            admin.query("SELECT old_name, new_name FROM branchsync.table_renames", &[]).await.unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
        assert_eq!(tables, [("orders".into(), "sale_order".into())]);
        let s = stream(&admin).await;
        let ords: Vec<i64> = s.iter().map(|m| ddl(m)["ordinal"].as_i64().unwrap()).collect();
        assert_eq!(ords, [1, 2]);
    }

    #[tokio::test]
    async fn rows_of_create_table_as_and_values_of_non_constant_new_columns_travel_as_rows() {
        let (_pg, admin, erp) = node().await;
        erp.batch_execute("CREATE TABLE snap AS SELECT id, shop FROM orders").await.unwrap();
        let s = stream(&admin).await;
        // test_decoding shows every table; the rows written before the table
        // joined the publication are not published (pgoutput), those after are.
        let at = s.iter().position(|m| m.starts_with('{')).expect("a DDL message");
        assert_eq!(ddl(&s[at])["tag"], "CREATE TABLE AS");
        assert_eq!(s[at..].iter().filter(|m| m.starts_with("table public.snap: INSERT")).count(), 3, "{s:#?}");
        assert_eq!(one::<i64>(&erp, "SELECT count(*) FROM snap").await, 3);

        erp.batch_execute("ALTER TABLE orders ADD COLUMN created timestamptz DEFAULT now()").await.unwrap();
        let s = stream(&admin).await;
        assert_eq!(s.iter().filter(|m| m.starts_with("table public.orders: UPDATE")).count(), 3, "the author's now() travels: {s:#?}");
        erp.batch_execute("ALTER TABLE orders ADD COLUMN r float8 DEFAULT random()").await.unwrap();
        assert_eq!(stream(&admin).await.iter().filter(|m| m.starts_with("table public.orders: UPDATE")).count(), 3);
        // A constant default needs nothing.
        erp.batch_execute("ALTER TABLE orders ADD COLUMN flag boolean NOT NULL DEFAULT false").await.unwrap();
        assert_eq!(stream(&admin).await.len(), 1);
    }

    #[tokio::test]
    async fn replayed_ddl_is_fixed_up_and_logged_but_not_emitted_again() {
        let (_pg, admin, erp) = node().await;
        erp.batch_execute("SET branchsync.replaying = on; CREATE TABLE gift (id serial PRIMARY KEY, shop text); RESET branchsync.replaying;").await.unwrap();
        assert!(stream(&admin).await.is_empty());
        assert_eq!(seq(&admin, "gift_id_seq").await.0, 100, "striped here too");
        assert_eq!(one::<i64>(&admin, "SELECT count(*) FROM branchsync.ddl_log WHERE replayed AND tag = 'CREATE TABLE'").await, 1);
    }

    #[tokio::test]
    async fn r22_the_helpers_refuse_to_forge_a_schema_change_outside_a_trigger() {
        let (_pg, admin, erp) = node().await;
        let e = erp
            .batch_execute("SELECT branchsync.on_ddl_end('postgres', 'DROP TABLE', 'public', true, '')")
            .await
            .unwrap_err();
        assert!(e.as_db_error().is_some_and(|d| d.message().contains("event trigger")), "{e:?}");
        assert!(erp.batch_execute("SELECT branchsync.stripe_sequence('orders_id_seq'::regclass)").await.is_err(), "not callable by the ERP");
        assert!(stream(&admin).await.is_empty());
    }
}
