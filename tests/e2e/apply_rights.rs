//! Issue 13, done-when 5 and 7: no superuser at run time, and settings
//! believed only from branchsync.
//!
//! The ERP's role (`erp`) owns its tables and writes code that runs inside
//! apply: a trigger enabled `ALWAYS`, a domain `CHECK`, a user cast and a
//! column `DEFAULT` that apply fills for a column the author's table lacks.
//! Each tries to make `erp` a superuser four ways. The daemon connects as
//! its own role (`branchsync`, created by `init`, not a superuser), so every
//! attempt fails; the rows still replicate both ways.

use std::time::Duration;

use branchsync_tests::*;

/// The ERP's schema and its hostile code, at every site. `local_attempts`
/// (not replicated) records each attempt: how, as whom, and what happened.
const HOSTILE_ERP: &str = r#"
CREATE ROLE erp LOGIN;
GRANT CREATE ON SCHEMA public TO erp;
SET ROLE erp;
CREATE TABLE local_attempts (site text, how text, who text, outcome text);
GRANT INSERT ON local_attempts TO PUBLIC;
CREATE FUNCTION try_escalate(how text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    BEGIN
        IF how = 'reset role' THEN
            EXECUTE 'RESET ROLE';
        ELSIF how = 'session authorization' THEN
            EXECUTE 'SET SESSION AUTHORIZATION postgres';
        ELSIF how = 'set_config role' THEN
            PERFORM set_config('role', 'postgres', true);
        END IF;
        EXECUTE 'ALTER ROLE erp SUPERUSER';
        INSERT INTO local_attempts VALUES (current_setting('cluster_name'), how, current_user, 'succeeded');
    EXCEPTION WHEN OTHERS THEN
        INSERT INTO local_attempts VALUES (current_setting('cluster_name'), how, current_user, SQLERRM);
    END;
    RETURN true;
END $$;
CREATE FUNCTION escalate_every_way(what text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    PERFORM try_escalate(what || ': direct');
    PERFORM try_escalate('reset role');
    PERFORM try_escalate('session authorization');
    PERFORM try_escalate('set_config role');
    RETURN true;
END $$;

CREATE TABLE sales (id int PRIMARY KEY, shop text NOT NULL);
CREATE FUNCTION sales_escalate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM escalate_every_way('trigger');
    PERFORM set_config('synchronous_commit', 'off', false);
    RETURN NEW;
END $$;
CREATE TRIGGER sales_escalate BEFORE INSERT ON sales FOR EACH ROW EXECUTE FUNCTION sales_escalate();
ALTER TABLE sales ENABLE ALWAYS TRIGGER sales_escalate;

CREATE FUNCTION check_escalate(v text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN RETURN escalate_every_way('domain check'); END $$;
CREATE DOMAIN checked_text AS text CHECK (check_escalate(VALUE));
CREATE TABLE notes (id int PRIMARY KEY, body checked_text);

CREATE TYPE mood AS ENUM ('calm', 'angry');
CREATE FUNCTION text_to_mood(t text) RETURNS mood LANGUAGE plpgsql AS $$
BEGIN
    PERFORM escalate_every_way('user cast');
    RETURN (SELECT m FROM unnest(enum_range(NULL::mood)) m WHERE m::text = t);
END $$;
CREATE CAST (text AS mood) WITH FUNCTION text_to_mood(text);
CREATE TABLE moods (id int PRIMARY KEY, m mood);

CREATE FUNCTION default_escalate() RETURNS text LANGUAGE plpgsql AS $$
BEGIN PERFORM escalate_every_way('default'); RETURN 'filled'; END $$;
CREATE TABLE tagged (id int PRIMARY KEY, v text);
RESET ROLE;
"#;

/// A session of the ERP's own login (a superuser's session with `SET ROLE`
/// would still be a superuser's session).
async fn erp_login(site: &Site) -> tokio_postgres::Client {
    let url = format!("{} user=erp", site.pg.url());
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect as erp");
    tokio::spawn(conn);
    c
}

async fn erp_is_superuser(c: &tokio_postgres::Client) -> bool {
    c.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = 'erp'", &[]).await.unwrap().get(0)
}

async fn attempts(c: &tokio_postgres::Client) -> Vec<(String, String, String)> {
    c.query("SELECT how, who, outcome FROM local_attempts ORDER BY how", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// Done-when 5: application code that runs inside apply, at the main and at
/// a branch, cannot make the ERP's role a superuser, and the stream flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_inside_apply_runs_as_branchsyncs_role_and_cannot_become_superuser() {
    let mut topo = Topology::prepare_with(1, HOSTILE_ERP, "").await;
    // At the main only, `tagged` has a column the branch's table lacks: apply
    // fills its DEFAULT there. Added by hand, outside replication.
    let main = topo.main.db().await;
    main.batch_execute(
        "SET branchsync.internal = on; ALTER TABLE tagged ADD COLUMN extra text DEFAULT default_escalate(); RESET branchsync.internal",
    )
    .await
    .unwrap();
    topo.start_all();
    let b1 = topo.branches[0].db().await;

    // The daemons connect as branchsync's role, which is not a superuser.
    for (site, c) in [("main", &main), ("branch1", &b1)] {
        let r = c.query_one("SELECT rolsuper, rolreplication FROM pg_roles WHERE rolname = 'branchsync'", &[]).await.unwrap();
        assert!(!r.get::<_, bool>(0) && r.get::<_, bool>(1), "{site}: branchsync's role is a replication role and not a superuser");
        // Once the daemon has connected (it may still be starting).
        let users: Vec<String> = eventually(&format!("{site}'s daemon connects"), Duration::from_secs(30), || async move {
            let users: Vec<String> = c
                .query("SELECT DISTINCT usename::text FROM pg_stat_activity WHERE application_name LIKE 'branchsync%'", &[])
                .await
                .ok()?
                .iter()
                .map(|r| r.get(0))
                .collect();
            (!users.is_empty()).then_some(users)
        })
        .await;
        assert_eq!(users, ["branchsync"], "{site}: every daemon connection is branchsync's role");
    }

    // Rows the ERP writes at the branch fire the code at the main, and rows
    // it writes at the main fire it at the branch.
    let (b1_erp, main_erp) = (erp_login(&topo.branches[0]).await, erp_login(&topo.main).await);
    b1_erp
        .batch_execute(
            "INSERT INTO sales VALUES (1, 'branch1'); INSERT INTO notes VALUES (1, 'from the shop');
             INSERT INTO moods VALUES (1, 'calm'); INSERT INTO tagged VALUES (1, 'from the shop');",
        )
        .await
        .unwrap();
    main_erp
        .batch_execute("INSERT INTO sales VALUES (2, 'main'); INSERT INTO notes VALUES (2, 'from the office'); INSERT INTO moods VALUES (2, 'angry');")
        .await
        .unwrap();
    wait_converged(&topo.sites(), &["sales", "notes", "moods"], Duration::from_secs(60)).await;
    let filled: Option<String> = main.query_one("SELECT extra FROM tagged WHERE id = 1", &[]).await.map(|r| r.get(0)).unwrap_or(None);
    assert_eq!(filled.as_deref(), Some("filled"), "the DEFAULT was filled at the main, by apply");

    for (site, c, from) in [("main", &main, ["trigger", "domain check", "user cast", "default"].as_slice()), ("branch1", &b1, ["trigger", "domain check", "user cast"].as_slice())] {
        assert!(!erp_is_superuser(c).await, "{site}: erp never became a superuser");
        let tried = attempts(c).await;
        for what in from {
            let direct = format!("{what}: direct");
            assert!(
                tried.iter().any(|(how, who, _)| *how == direct && who == "branchsync"),
                "{site}: the {what} ran inside apply, as branchsync's role: {tried:?}"
            );
        }
        for (how, who, outcome) in &tried {
            assert_ne!(outcome, "succeeded", "{site}: {how} as {who} succeeded");
        }
        // What the ERP's own session tried failed too, as it should (erp).
        assert!(tried.iter().any(|(_, who, _)| who == "erp"), "{site}: {tried:?}");
        for how in ["reset role", "session authorization", "set_config role"] {
            assert!(tried.iter().any(|(h, _, _)| h == how), "{site}: {how} was tried: {tried:?}");
        }
    }

    // The stream flows on: later sales arrive both ways.
    b1_erp.batch_execute("INSERT INTO sales VALUES (3, 'branch1')").await.unwrap();
    main_erp.batch_execute("INSERT INTO sales VALUES (4, 'main')").await.unwrap();
    wait_converged(&topo.sites(), &["sales"], Duration::from_secs(30)).await;
    assert!(!erp_is_superuser(&main).await && !erp_is_superuser(&b1).await);
}

/// Done-when 7 (settings): an ERP session that sets every `branchsync.*`
/// setting the event triggers read still has its DDL captured and its new
/// sequence striped; a statement count it forged is not believed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_session_that_sets_branchsyncs_settings_itself_still_has_its_ddl_captured() {
    let mut topo = Topology::prepare_with(1, HOSTILE_ERP, "").await;
    topo.start_all();
    // The ERP's own login, not a superuser's session with SET ROLE.
    let erp = erp_login(&topo.main).await;
    erp.batch_execute(
        "SET branchsync.internal = on; SET branchsync.replaying = on; SET branchsync.dropped = on; SET branchsync.rewritten = '1,2,3';
         SELECT set_config('branchsync.ddl_key', statement_timestamp()::text || '/' || md5(current_query()) || '#41#forged', false);
         CREATE TABLE hidden (id serial PRIMARY KEY, v text);
         INSERT INTO hidden (v) VALUES ('a'), ('b');",
    )
    .await
    .unwrap();
    // A forged note that the statement dropped something replicated does
    // not make DDL of an object outside the replication travel (a temporary
    // table; an excluded table's schema follows the main's anyway).
    erp.batch_execute("SET branchsync.dropped = on; CREATE TEMP TABLE local_forged (id int)").await.unwrap();
    // Striped at the main: ids ≡ 0 (mod 100).
    let ids: Vec<i32> = erp.query("SELECT id FROM hidden ORDER BY id", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert!(ids.iter().all(|i| i % 100 == 0), "the new sequence is striped: {ids:?}");
    let main = topo.main.db().await;
    let logged: i64 = main.query_one("SELECT count(*) FROM branchsync.ddl_log WHERE query LIKE '%CREATE TABLE hidden%' AND NOT replayed", &[]).await.unwrap().get(0);
    assert_eq!(logged, 1, "the DDL was captured as the main's own, not as replayed");
    let forged: i64 = main.query_one("SELECT count(*) FROM branchsync.ddl_log WHERE query LIKE '%local_forged%'", &[]).await.unwrap().get(0);
    assert_eq!(forged, 0, "a forged branchsync.dropped did not put a temporary table's DDL in the stream");
    wait_converged(&topo.sites(), &["hidden"], Duration::from_secs(30)).await;
    let b1 = topo.branches[0].db().await;
    b1.batch_execute("INSERT INTO hidden (v) VALUES ('at the shop')").await.unwrap();
    let id: i32 = b1.query_one("SELECT id FROM hidden WHERE v = 'at the shop'", &[]).await.unwrap().get(0);
    assert_eq!(id % 100, 1, "the replayed table's sequence is striped at the branch");
    wait_converged(&topo.sites(), &["hidden"], Duration::from_secs(30)).await;
}

/// A CA and a server certificate for 127.0.0.1, as PEM: (ca, cert, key).
fn database_certificates() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

/// Issue 13: a database on another host is reached over TLS
/// (`sslmode=require`), its certificate verified against `sslrootcert`;
/// without `sslrootcert`, or against another CA, nothing connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_reaches_its_database_over_verified_tls_when_the_url_asks_for_it() {
    let mut topo = Topology::prepare(1, POS_SCHEMA).await;
    let branch = &topo.branches[0];
    // branch1's PostgreSQL: TLS on, and branchsync's role only over TLS.
    let (ca, cert, key) = database_certificates();
    let dir = branch.pg.base_dir().to_path_buf();
    std::fs::write(dir.join("server.crt"), cert).unwrap();
    std::fs::write(dir.join("server.key"), key).unwrap();
    std::fs::write(dir.join("root.crt"), &ca).unwrap();
    let (other_ca, _, _) = database_certificates();
    std::fs::write(dir.join("other.crt"), other_ca).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("server.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    if engine_cluster_runs_as_postgres() {
        let st = std::process::Command::new("chown").args(["postgres", &dir.join("server.key").display().to_string(), &dir.join("server.crt").display().to_string()]).status().unwrap();
        assert!(st.success());
    }
    let hba = branch.pg.data_dir().join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(&hba, format!("hostnossl all branchsync 127.0.0.1/32 reject\n{old}")).unwrap();
    let admin = branch.db().await;
    for sql in [
        format!("ALTER SYSTEM SET ssl_cert_file = '{}'", dir.join("server.crt").display()),
        format!("ALTER SYSTEM SET ssl_key_file = '{}'", dir.join("server.key").display()),
        "ALTER SYSTEM SET ssl = on".to_string(),
        "SELECT pg_reload_conf()".to_string(),
    ] {
        admin.batch_execute(&sql).await.unwrap();
    }
    // The reload is asynchronous: wait until the server says TLS is on.
    let admin = &admin;
    eventually("TLS on at branch1's server", Duration::from_secs(10), || async move {
        let on: String = admin.query_one("SHOW ssl", &[]).await.ok()?.get(0);
        (on == "on").then_some(())
    })
    .await;
    let plain_url = branch.pg.url();
    let set_url = |url: &str| {
        let text = std::fs::read_to_string(branch.config_path()).unwrap();
        let start = text.find("url = \"").unwrap() + 7;
        let end = start + text[start..].find('"').unwrap();
        std::fs::write(branch.config_path(), format!("{}{url}{}", &text[..start], &text[end..])).unwrap();
    };

    // Plaintext is refused by the server now; without sslrootcert branchsync
    // will not connect unverified; another CA fails verification.
    let status_err = |branch: &Site| String::from_utf8_lossy(&branch.cli(&["status"]).stderr).to_string();
    let err = status_err(branch);
    assert!(err.contains("cannot connect"), "plaintext is rejected: {err}");
    set_url(&format!("{plain_url} sslmode=require"));
    let err = status_err(branch);
    assert!(err.contains("sslrootcert"), "sslmode=require without sslrootcert: {err}");
    set_url(&format!("{plain_url} sslmode=require sslrootcert={}", dir.join("other.crt").display()));
    let err = status_err(branch);
    assert!(err.contains("cannot connect"), "a certificate of another CA: {err}");

    set_url(&format!("{plain_url} sslmode=require sslrootcert={}", dir.join("root.crt").display()));
    topo.start_all();
    let b1 = topo.branches[0].db().await;
    for _ in 0..5 {
        sell(&b1, "branch1", 2).await;
    }
    wait_converged(&topo.sites(), POS_TABLES, Duration::from_secs(60)).await;
    let plain: i64 = b1
        .query_one(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.usename = 'branchsync' AND NOT s.ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let tls: i64 = b1
        .query_one("SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.usename = 'branchsync' AND s.ssl", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(plain, 0, "no daemon connection is plaintext");
    assert!(tls >= 2, "the daemon's connections use TLS ({tls})");
}

fn engine_cluster_runs_as_postgres() -> bool {
    branchsync_engine::cluster::running_as_root()
}

/// Issue 13: a replicated table whose row-level security would hide rows
/// from branchsync's role is refused, with a message, as PostgreSQL's own
/// apply worker refuses it; `init` warns; the rest of the stream flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_whose_row_level_security_applies_to_branchsync_is_refused_and_the_stream_flows() {
    let schema = format!(
        "{POS_SCHEMA}
         CREATE TABLE vouchers (id int PRIMARY KEY, shop text NOT NULL);
         ALTER TABLE vouchers ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own_shop ON vouchers USING (shop = current_user);"
    );
    let mut topo = Topology::prepare(1, &schema).await;
    let out = topo.main.cli(&["init"]);
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(said.contains("row-level security is enabled on public.vouchers"), "init warns: {said}");
    topo.start_all();
    let b1 = topo.branches[0].db().await;
    b1.batch_execute("INSERT INTO vouchers VALUES (1, 'branch1')").await.unwrap();
    sell(&b1, "branch1", 2).await;
    // The sale arrives; the voucher does not, and the main says why.
    let main = topo.main.db().await;
    let detail = eventually("the main refuses the voucher", Duration::from_secs(30), || {
        let main = &main;
        async move {
            let r = main
                .query_opt("SELECT coalesce(detail, '') FROM branchsync.conflicts WHERE kind = 'quarantined' AND detail LIKE '%row-level security applies to role%'", &[])
                .await
                .ok()??;
            Some(r.get::<_, String>(0))
        }
    })
    .await;
    assert!(detail.contains("vouchers"), "{detail}");
    let vouchers: i64 = main.query_one("SELECT count(*) FROM vouchers", &[]).await.unwrap().get(0);
    assert_eq!(vouchers, 0);
    sell(&b1, "branch1", 1).await;
    wait_converged(&topo.sites(), POS_TABLES, Duration::from_secs(30)).await;
}
