//! Issue 12, done-when 2 (R25): only branchsync speaks for branchsync.
//!
//! An application role that is not a superuser writes logical messages
//! under every prefix branchsync uses (apply, DDL, verdict, conflict),
//! transactional and not, garbage and well-formed (a well-formed one names
//! another author, or carries `DROP TABLE products`), at the main and at a
//! branch: first with `init`'s REVOKE in place (refused by PostgreSQL),
//! then with EXECUTE granted back to it. Finally an `ENABLE ALWAYS` trigger
//! forges marks from inside an apply transaction at the main. Nothing
//! stops, nothing is hidden (the rows of those transactions replicate),
//! nothing forged is replayed or decided on, and `status` counts the events.

use std::time::Duration;

use branchsync_engine::state::ApplyMark;
use branchsync_proto::{ChangeSetHeader, ConflictRecord, TableDef, TableDesc, Value, Verdict};
use branchsync_tests::*;

const SCHEMA: &str = "
CREATE TABLE products (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE orders (id serial PRIMARY KEY, shop text NOT NULL, note text);
CREATE ROLE erp LOGIN;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO erp;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO erp;
INSERT INTO products VALUES (1, 'bread'), (2, 'milk');
";

const PREFIXES: [&str; 4] = ["branchsync.apply", "branchsync.ddl", "branchsync.verdict", "branchsync.conflict"];

/// A well-formed body for each prefix, followed by a made-up seal.
fn well_formed(prefix: &str, author: &str) -> Vec<u8> {
    let header = ChangeSetHeader { author: author.into(), author_index: 0, system_id: 1, commit_lsn: 42, commit_ts_us: 4_102_444_800_000_000, stamp: 4_102_444_800_000_000, seen_main_ts: 0 };
    let mut body = match prefix {
        "branchsync.apply" => rmp_serde::to_vec(&ApplyMark { header, relay_ts_us: 0, sent: None }).unwrap(),
        "branchsync.ddl" => {
            let j = serde_json::json!({"query": "DROP TABLE products", "search_path": "public", "role": "erp", "tag": "DROP TABLE", "ordinal": 1, "key": "k"});
            let mut t = j.to_string().into_bytes();
            t.push(b'\n');
            t.extend("ab".repeat(32).into_bytes());
            return t;
        }
        "branchsync.verdict" => {
            let desc = TableDesc::from(TableDef { schema: "public".into(), name: "products".into(), columns: vec!["id".into(), "name".into()], key: vec![true, false], identity_full: true });
            rmp_serde::to_vec(&(desc, Verdict { table: 0, key: vec![Value::Text("1".into()), Value::Null], row: None, for_commit_ts: 0, to: None })).unwrap()
        }
        _ => rmp_serde::to_vec(&ConflictRecord {
            id: 999_999,
            table: "public.products".into(),
            key: Some("[\"1\"]".into()),
            kind: "forged".into(),
            rule: "lww".into(),
            winner: None,
            loser: None,
            local_version: None,
            remote_version: None,
            detail: Some("forged".into()),
            at_us: 0,
        })
        .unwrap(),
    };
    body.extend([7u8; 32]);
    body
}

/// As `erp` at `site`: for every prefix, transactional and not, garbage
/// and well-formed, a transaction that sells one order and writes the mark.
/// Returns how many marks were written.
async fn forge_all(site: &Site, author_named: &str) -> u64 {
    let c = site.db().await;
    c.batch_execute("SET ROLE erp").await.unwrap();
    let mut n = 0;
    for p in PREFIXES {
        for transactional in [true, false] {
            for (kind, payload) in [("garbage", b"\x01\x02 not a mark".to_vec()), ("well-formed", well_formed(p, author_named))] {
                let note = format!("{p} {} {kind}", if transactional { "tx" } else { "nontx" });
                c.batch_execute("BEGIN").await.unwrap();
                c.execute("INSERT INTO orders (shop, note) VALUES ($1, $2)", &[&site.name, &note]).await.unwrap();
                c.execute("SELECT pg_logical_emit_message($1, $2, $3::bytea)::text", &[&transactional, &p, &payload]).await.unwrap();
                c.batch_execute("COMMIT").await.unwrap();
                n += 1;
            }
        }
    }
    n
}

async fn forged_counted(site: &Site, n: u64) -> serde_json::Value {
    wait_status(site, &format!("{} counts {n} forged marks", site.name), Duration::from_secs(30), |s| s["forged_marks"].as_u64() == Some(n)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_marks_are_ignored_counted_and_their_rows_replicate() {
    let mut topo = Topology::prepare(1, SCHEMA).await;
    topo.start_all();
    wait_status(&topo.main, "branch1 connected", Duration::from_secs(30), |s| s["peers"]["branch1"]["connected"] == true).await;

    // 1. init revoked the function from PUBLIC: the application role cannot
    //    call it at all.
    for site in topo.sites() {
        let c = site.db().await;
        c.batch_execute("SET ROLE erp").await.unwrap();
        let e = c.execute("SELECT pg_logical_emit_message(true, 'branchsync.apply', 'x')::text", &[]).await.expect_err("PUBLIC may not emit messages after init");
        assert_eq!(e.code().map(|c| c.code()), Some("42501"), "{e}");
    }

    // 2. Granted back (a careless operator): forged marks are written, at
    //    both sites, and change nothing but the counters.
    for site in topo.sites() {
        site.db()
            .await
            .batch_execute("GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text), pg_logical_emit_message(boolean, text, bytea) TO erp")
            .await
            .unwrap();
    }
    let at_main = forge_all(&topo.main, "branch1").await;
    let at_branch = forge_all(&topo.branches[0], "main").await;
    wait_converged(&topo.sites(), &["orders", "products"], Duration::from_secs(30)).await;
    for site in topo.sites() {
        let c = site.db().await;
        let n: i64 = c.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get(0);
        assert_eq!(n as u64, at_main + at_branch, "every forging transaction replicated at {}", site.name);
        let products: i64 = c.query_one("SELECT count(*) FROM products", &[]).await.unwrap().get(0);
        assert_eq!(products, 2, "no forged schema change or verdict ran at {}", site.name);
        let forged: i64 = c.query_one("SELECT count(*) FROM branchsync.conflicts WHERE kind = 'forged' OR origin_id = 999999", &[]).await.unwrap().get(0);
        assert_eq!(forged, 0, "no forged conflict record was kept at {}", site.name);
    }
    let st = forged_counted(&topo.main, at_main).await;
    assert_eq!(st["forged_by_prefix"]["branchsync.ddl"], 4, "{st}");
    forged_counted(&topo.branches[0], at_branch).await;
    topo.main.wait_log("was not written by branchsync", Duration::from_secs(5)).await;
    let st = wait_status(&topo.main, "the ACL alarm", Duration::from_secs(30), |s| s["emit_message_warning"].is_string()).await;
    println!("main status: forged {} {}, warning: {}", st["forged_marks"], st["forged_by_prefix"], st["emit_message_warning"]);

    // 3. A trigger enabled ALWAYS forges marks from inside the apply
    //    transaction of branch1's sale at the main.
    topo.main
        .db()
        .await
        .batch_execute(&format!(
            "CREATE FUNCTION forge() RETURNS trigger LANGUAGE plpgsql AS $f$
             BEGIN
                 -- The function replicates with the trigger; it forges at the main only.
                 IF inet_server_port() = {} THEN
                     PERFORM pg_logical_emit_message(true, 'branchsync.apply', '\\x{}'::bytea);
                     PERFORM pg_logical_emit_message(true, 'branchsync.ddl', convert_from('\\x{}'::bytea, 'UTF8'));
                 END IF;
                 RETURN NEW;
             END $f$;
             CREATE TRIGGER forge AFTER INSERT ON orders FOR EACH ROW EXECUTE FUNCTION forge();
             ALTER TABLE orders ENABLE ALWAYS TRIGGER forge;",
            topo.main.pg.port(),
            hex(&well_formed("branchsync.apply", "main")),
            hex(&well_formed("branchsync.ddl", "main"))
        ))
        .await
        .unwrap();
    // init takes the grant back, and the alarm goes.
    topo.main.init();
    wait_status(&topo.main, "the ACL alarm is gone", Duration::from_secs(30), |s| s["emit_message_warning"].is_null()).await;
    let b1 = topo.branches[0].db().await;
    b1.batch_execute("INSERT INTO orders (shop, note) VALUES ('branch1', 'after the trigger')").await.unwrap();
    forged_counted(&topo.main, at_main + 2).await;
    wait_converged(&topo.sites(), &["orders", "products"], Duration::from_secs(30)).await;
    let c = topo.main.db().await;
    let r = c.query_one("SELECT count(*) FROM orders WHERE note = 'after the trigger'", &[]).await.unwrap();
    assert_eq!(r.get::<_, i64>(0), 1);
    // The relay kept branch1's header: its sale came back to branch1 as its
    // own (an echo), not as a change of "main" (which would count as a
    // conflict-free foreign write and leave no trace); and products stay.
    assert_eq!(b1.query_one("SELECT count(*) FROM products", &[]).await.unwrap().get::<_, i64>(0), 2);
    let b1st = http_status(topo.branches[0].http_port).await.unwrap();
    assert_eq!(b1st["forged_marks"].as_u64(), Some(at_branch), "the branch skipped no transaction of its own and captured nothing new: {b1st}");
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
