//! A shop's sales come back from the main as echoes. When the main wrote a
//! ChangeSet exactly as the shop sent it, the echo is taken without reading
//! its rows; when the main wrote something else (here a trigger at the main,
//! enabled ALWAYS, changes a column), the rows come back and are written.
//! Either way every row ends decided at the shop: a later change the main
//! makes to it is written there.

use std::time::Duration;

use branchsync_tests::*;

const SCHEMA: &str = "
CREATE TABLE sales (id serial PRIMARY KEY, shop text NOT NULL, amount numeric(10,2) NOT NULL);
CREATE TABLE vouchers (id serial PRIMARY KEY, code text NOT NULL);
CREATE FUNCTION vouchers_at_main() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT role FROM branchsync.node) = 'main' THEN
        NEW.code := upper(NEW.code);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER vouchers_at_main BEFORE INSERT ON vouchers FOR EACH ROW EXECUTE FUNCTION vouchers_at_main();
ALTER TABLE vouchers ENABLE ALWAYS TRIGGER vouchers_at_main;
";

const TABLES: &[&str] = &["sales", "vouchers"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoes_written_as_sent_come_back_without_rows_and_rows_changed_at_the_main_come_back_whole() {
    const SALES: u64 = 40;
    const VOUCHERS: u64 = 10;
    let mut topo = Topology::prepare(1, SCHEMA).await;
    topo.start_all();
    let b1 = topo.branches[0].db().await;
    for i in 0..SALES {
        b1.batch_execute(&format!("INSERT INTO sales (shop, amount) VALUES ('branch1', {i}.50)")).await.unwrap();
        if i % (SALES / VOUCHERS) == 0 {
            b1.batch_execute(&format!("INSERT INTO vouchers (code) VALUES ('gift{i}')")).await.unwrap();
        }
    }
    wait_converged(&topo.sites(), TABLES, Duration::from_secs(60)).await;
    let lower: i64 = b1.query_one("SELECT count(*) FROM vouchers WHERE code <> upper(code)", &[]).await.unwrap().get(0);
    assert_eq!(lower, 0, "the vouchers came back as the main's trigger wrote them");

    // Every sale's echo was taken as sent, no voucher's.
    let st = wait_status(&topo.branches[0], "every sale's echo taken", Duration::from_secs(30), |s| s["peers"]["main"]["echoes_as_sent"].as_u64() >= Some(SALES)).await;
    assert_eq!(st["peers"]["main"]["echoes_as_sent"].as_u64(), Some(SALES), "{}", st["peers"]["main"]);
    let main_st = wait_status(&topo.main, "every sale relayed as sent", Duration::from_secs(30), |s| s["relayed_as_sent"].as_u64() >= Some(SALES)).await;
    assert_eq!(main_st["relayed_as_sent"].as_u64(), Some(SALES));
    let settled: bool = b1
        .query_one("SELECT through_ts >= (SELECT max((extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1000000)::int8) FROM sales) FROM branchsync.echo_settled", &[])
        .await
        .unwrap()
        .get(0);
    assert!(settled, "the settled mark passed the last sale");

    // The sales are decided at the shop: the main's own changes to them
    // are written there.
    let main = topo.main.db().await;
    main.batch_execute("UPDATE sales SET amount = amount + 1; UPDATE vouchers SET code = code || '-USED'").await.unwrap();
    wait_converged(&topo.sites(), TABLES, Duration::from_secs(60)).await;
    let used: i64 = b1.query_one("SELECT count(*) FROM vouchers WHERE code LIKE '%-USED'", &[]).await.unwrap().get(0);
    assert_eq!(used as u64, VOUCHERS);
}
