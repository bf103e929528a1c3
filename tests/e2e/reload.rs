//! Issue 15 (deployment): `SIGHUP` reloads who may connect — the main's
//! `[[sync.peers]]` and `[tls] revoked`, a branch's own token — without
//! dropping the other links. A branch taken off the list is disconnected
//! and refused; put back with a rotated token (the shop reloads its own)
//! it catches up; a revoked certificate ends its session; a file that does
//! not load changes nothing. Through all of it the other branch's session
//! is never restarted and its sales keep arriving.

use std::time::Duration;

use branchsync_tests::*;

const ROTATED: &str = "rotated-token-5b1e0c9d77";

/// Link sessions the main has opened for `peer` so far.
async fn sessions_at_main(main: &Site, peer: &str) -> u64 {
    wait_status(main, "the main answers", Duration::from_secs(20), |_| true).await["peers"][peer]["sessions"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_changes_who_may_connect_without_dropping_the_other_links() {
    let mut topo = Topology::prepare(2, POS_SCHEMA).await;
    topo.start_all();
    stock_the_shelves(&topo).await;
    let main = topo.main.db().await;
    let b1 = topo.branches[0].db().await;
    let b2 = topo.branches[1].db().await;
    wait_status(&topo.main, "both branches connected", Duration::from_secs(30), |s| s["peers"]["branch1"]["connected"] == true && s["peers"]["branch2"]["connected"] == true).await;
    let branch1_sessions = sessions_at_main(&topo.main, "branch1").await;

    // 1. branch2 taken off the main's list: disconnected, refused, gone
    //    from status; branch1 goes on in the same session.
    let branch2_entry = format!("[[sync.peers]]\nname = \"branch2\"\nindex = 2\ntoken = \"{TOKEN}\"\n");
    edit_config(&topo.main, &branch2_entry, "");
    topo.main.reload();
    topo.main.wait_log("ending the branch's session", Duration::from_secs(20)).await;
    wait_status(&topo.main, "branch2 is no longer a peer of the main", Duration::from_secs(20), |s| s["peers"].get("branch2").is_none()).await;
    for _ in 0..5 {
        sell(&b1, "branch1", 2).await;
        sell(&b2, "branch2", 2).await;
    }
    topo.main.wait_log("unknown node \"branch2\"", Duration::from_secs(30)).await;
    eventually("branch1's sales reach the main", Duration::from_secs(60), || async { (sales_of(&main, "branch1").await.0 == 5).then_some(()) }).await;
    assert_eq!(sales_of(&main, "branch2").await.0, 0, "a branch taken off the list must not deliver");
    assert_eq!(sessions_at_main(&topo.main, "branch1").await, branch1_sessions, "branch1's session must survive the reload");

    // 2. branch2 back with a rotated token, reloaded at both ends: it
    //    catches up; branch1 still in its first session.
    edit_config(&topo.main, "[keys]", &format!("{}[keys]", branch2_entry.replace(TOKEN, ROTATED)));
    topo.main.reload();
    edit_config(&topo.branches[1], &format!("token = \"{TOKEN}\""), &format!("token = \"{ROTATED}\""));
    topo.branches[1].reload();
    wait_converged(&topo.sites(), POS_TABLES, Duration::from_secs(60)).await;
    assert_eq!(sales_of(&main, "branch2").await.0, 5, "branch2's sales made while it was refused");
    assert_eq!(sessions_at_main(&topo.main, "branch1").await, branch1_sessions, "branch1's session must survive the reloads");

    // 3. branch1's certificate revoked: its session ends and it is refused
    //    in the TLS handshake; branch2's session is untouched.
    let st = wait_status(&topo.main, "branch1's certificate is known", Duration::from_secs(20), |s| s["peers"]["branch1"]["certificate"].is_string()).await;
    let fingerprint = st["peers"]["branch1"]["certificate"].as_str().unwrap().to_string();
    let branch2_sessions = sessions_at_main(&topo.main, "branch2").await;
    let text = std::fs::read_to_string(topo.main.config_path()).unwrap();
    std::fs::write(topo.main.config_path(), format!("{text}\n[tls]\nrevoked = [\"{fingerprint}\"]\n")).unwrap();
    topo.main.reload();
    wait_status(&topo.branches[0], "branch1 is refused as revoked", Duration::from_secs(30), |s| {
        s["peers"]["main"]["connected"] == false && s["peers"]["main"]["last_error"].as_str().is_some_and(|e| e.contains("revoked"))
    })
    .await;
    sell(&b2, "branch2", 2).await;
    eventually("branch2's sale after the revocation reaches the main", Duration::from_secs(60), || async { (sales_of(&main, "branch2").await.0 == 6).then_some(()) }).await;
    assert_eq!(sessions_at_main(&topo.main, "branch2").await, branch2_sessions, "branch2's session must survive the revocation of another");

    // 4. A configuration that does not load changes nothing.
    std::fs::write(topo.main.config_path(), "[node\nthis is not TOML").unwrap();
    topo.main.reload();
    topo.main.wait_log("configuration not reloaded", Duration::from_secs(20)).await;
    assert!(topo.main.running(), "a bad file must not stop the daemon");
    sell(&b2, "branch2", 2).await;
    eventually("branch2 still delivers", Duration::from_secs(60), || async { (sales_of(&main, "branch2").await.0 == 7).then_some(()) }).await;
    assert_eq!(sessions_at_main(&topo.main, "branch2").await, branch2_sessions);
}
