//! The offline day, as a benchmark (issue 12, done-when 3): branch1 sells
//! `OFFLINE_SALES` one-sale transactions (an order and four lines each;
//! default 1,000,000) while cut off, then its link heals while the main and
//! branch2 keep selling. Prints how long the day took to reach the main and
//! to converge everywhere, and checks every sale at every site exactly
//! once. The test suite runs the same with 100,000 sales
//! (`tests/e2e/backlog.rs`).
//!
//! ```text
//! cargo build -p branchsync-server --features failpoints
//! cargo bench -p branchsync-tests --bench offline_day
//! ```

fn main() {
    let sales: i32 = std::env::var("OFFLINE_SALES").ok().and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(branchsync_tests::offline_day(sales));
}
