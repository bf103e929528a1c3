//! Issue 12, done-when 1 (R24): large values are carried, in bounded
//! memory. A branch commits one 200 MB `bytea` value (a scanned document
//! kept in the database, as ERPs do) and, in one transaction, 2,000 rows of
//! 50 KB. Both reach the main and the other branch intact (compared by
//! md5 at every site). Each daemon's peak RSS (VmHWM) stays within 256 MiB
//! plus three times the largest row as PostgreSQL hands it to logical
//! decoding (a bytea value travels as hex text: twice its size).

use std::time::{Duration, Instant};

use branchsync_tests::*;

const SCHEMA: &str = "CREATE TABLE attachments (id int PRIMARY KEY, name text NOT NULL, data bytea NOT NULL);";

const MIB: u64 = 1024 * 1024;
/// The large value, in bytes.
const BIG: u64 = 200 * MIB;

async fn digests(c: &tokio_postgres::Client) -> Vec<(i32, i32, String)> {
    c.query("SELECT id, length(data), md5(data) FROM attachments ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_mb_value_and_2000_rows_of_50_kb_in_one_transaction_arrive_intact_in_bounded_memory() {
    let mut topo = Topology::prepare(2, SCHEMA).await;
    topo.start_all();
    wait_status(&topo.main, "both branches connected", Duration::from_secs(30), |s| {
        s["peers"]["branch1"]["connected"] == true && s["peers"]["branch2"]["connected"] == true
    })
    .await;
    let b1 = topo.branches[0].db().await;
    let t = Instant::now();
    // 200 MB that does not compress (a 2 MiB random-looking block, repeated:
    // further apart than pglz looks back).
    b1.batch_execute(&format!(
        "INSERT INTO attachments SELECT 1, 'scan.pdf', decode(repeat((SELECT string_agg(md5(g::text), '') FROM generate_series(1, 65536) g), {}), 'hex')",
        BIG / MIB
    ))
    .await
    .unwrap();
    b1.batch_execute("INSERT INTO attachments SELECT 100 + g, 'page ' || g, decode(repeat(md5(g::text), 3200), 'hex') FROM generate_series(1, 2000) g").await.unwrap();
    println!("branch1 committed a {} MiB value and 2000 rows of 50 KiB in {:.1} s", BIG / MIB, t.elapsed().as_secs_f64());
    let want = digests(&b1).await;
    assert_eq!(want.len(), 2001);
    assert_eq!(want[0].1 as u64, BIG);
    assert_eq!(want[1].1, 51_200);
    let mut peaks = vec![0u64; 3];
    let deadline = Instant::now() + Duration::from_secs(900);
    for s in [&topo.main, &topo.branches[1]] {
        let c = s.db().await;
        loop {
            for (j, site) in topo.sites().into_iter().enumerate() {
                peaks[j] = peaks[j].max(site.pid().and_then(peak_rss_kib).unwrap_or(0));
            }
            if digests(&c).await == want {
                break;
            }
            assert!(Instant::now() < deadline, "the values did not reach {} intact", s.name);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        println!("intact at {} after {:.1} s", s.name, t.elapsed().as_secs_f64());
    }
    // The echo of branch1's rows settles there too; then the peaks.
    wait_converged(&topo.sites(), &["attachments"], Duration::from_secs(300)).await;
    let largest_row = 2 * BIG; // hex text, as logical decoding hands it over
    let bound_kib = (256 * MIB + 3 * largest_row) / 1024;
    for (j, site) in topo.sites().into_iter().enumerate() {
        let peak = peaks[j].max(site.pid().and_then(peak_rss_kib).unwrap_or(0));
        println!("peak RSS (VmHWM) of {}'s daemon: {} MiB (bound {} MiB)", site.name, peak / 1024, bound_kib / 1024);
        assert!(peak > 0, "no RSS read for {}", site.name);
        assert!(peak <= bound_kib, "{}'s daemon peaked at {} MiB, above 256 MiB + 3 x {} MiB", site.name, peak / 1024, largest_row / MIB);
    }
}
