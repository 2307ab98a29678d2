//! The stage latencies on `/metrics` (`outbox_relay_stage_latency_seconds`,
//! label `stage` = server | relay | broker): exported from the start, one
//! observation per record and stage after real traffic, adding up to the
//! end-to-end histogram, and blaming the broker when the broker is the slow one.

mod harness;

use std::time::Duration;

use harness::outbox::{insert_rows, Env, Expected, DEADLINE};
use harness::scrape::{above, get, has_series, http_addr, sample};
use harness::{wait_until, PgVersion, RelayProcess};

const STAGE: &str = "outbox_relay_stage_latency_seconds";
const E2E: &str = "outbox_relay_end_to_end_latency_seconds";
const STAGES: [&str; 3] = ["server", "relay", "broker"];

fn stage_sum(body: &str) -> f64 {
    STAGES
        .iter()
        .map(|s| sample(body, &format!("{STAGE}_sum"), Some(("stage", s))))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_latencies_are_exported_add_up_and_blame_a_hung_broker() {
    let mut env = Env::new(PgVersion::V15).await;
    let client = env.client().await;
    let mut relay = RelayProcess::spawn(&env.args(&[]), &[("RUST_LOG", "info")]);
    env.wait_streaming(&mut relay).await;
    let addr = http_addr(&mut relay).await;

    // Before any record: the three series are there, empty.
    let (_, body) = get(&addr, "/metrics").await;
    for stage in STAGES {
        assert!(
            has_series(&body, STAGE, ("stage", stage)),
            "no {STAGE}{{stage={stage:?}}} before traffic:\n{body}"
        );
        assert_eq!(
            sample(&body, &format!("{STAGE}_count"), Some(("stage", stage))),
            0.0
        );
    }

    // Traffic: every record is observed once in every stage.
    let n = insert_rows(&client, 0, 30, 4).await;
    let expected = Expected::read(&client).await;
    expected.check(&expected.consume(&env.broker).await);
    let counted = |n: u64| {
        let addr = addr.clone();
        move || {
            let addr = addr.clone();
            async move {
                let (_, body) = get(&addr, "/metrics").await;
                sample(&body, &format!("{E2E}_count"), None) >= n as f64
                    && STAGES.iter().all(|s| {
                        sample(&body, &format!("{STAGE}_count"), Some(("stage", s))) >= n as f64
                    })
            }
        }
    };
    wait_until(DEADLINE, "every stage counts every record", counted(n)).await;
    let (_, body) = get(&addr, "/metrics").await;
    for stage in STAGES {
        assert_eq!(
            sample(&body, &format!("{STAGE}_count"), Some(("stage", stage))),
            n as f64,
            "stage {stage}: one observation per record"
        );
        assert!(sample(&body, &format!("{STAGE}_sum"), Some(("stage", stage))) > 0.0);
    }

    // The broker hangs for 3 s while rows are written: the relay reads and
    // hands them over at once (the window has room), so only the broker
    // stage holds the wait.
    env.broker.pause();
    let m = insert_rows(&client, n, 10, 1).await - n;
    tokio::time::sleep(Duration::from_secs(3)).await;
    env.broker.resume();
    wait_until(
        DEADLINE,
        "the records of the hang are counted",
        counted(n + m),
    )
    .await;
    let (_, body) = get(&addr, "/metrics").await;
    let slow = |stage: &str| above(&body, STAGE, ("stage", stage), 1.0);
    assert!(
        slow("broker") >= m as f64,
        "the {m} records written during the hang waited > 1 s on the broker: {} did",
        slow("broker")
    );
    assert_eq!(slow("relay"), 0.0, "the relay stage took > 1 s");
    assert_eq!(slow("server"), 0.0, "the server stage took > 1 s");

    // The stages add up to the end-to-end figure (each record's clock readings
    // are per burst, so allow 5 ms per record and 5 %).
    let e2e = sample(&body, &format!("{E2E}_sum"), None);
    let records = sample(&body, &format!("{E2E}_count"), None);
    let split = stage_sum(&body);
    assert!(
        (split - e2e).abs() <= 0.005 * records + 0.05 * e2e,
        "stages add up to {split:.3} s, end to end {e2e:.3} s over {records} records"
    );
    relay.sigterm();
    assert!(relay.wait_exit(DEADLINE).await.is_some());
}
