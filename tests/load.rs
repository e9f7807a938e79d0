//! Load and faults, the short variant of `ztunnel-load` ([`ztunnel_e2e::load`]): a thousand
//! connections held at once and checked, then a churn of connections (request/response and
//! bulk, every byte compared) while n2's daemon is rolled and later killed and restarted.
//! Nothing is corrupted; nothing fails but what was in flight or started while the
//! destination's daemon was down; and afterwards the daemon that ran throughout holds no more
//! descriptors than before the load (no leak), nor any tracked connection.

use std::time::Duration;

use ztunnel_e2e::load::{self, Outcome, Plan};
use ztunnel_e2e::testbed::TestBed;

#[test]
fn connections_held_and_churned_through_a_roll_and_a_kill_lose_nothing_and_leak_nothing() {
    let plan = Plan {
        held: 1000,
        churn: Duration::from_secs(30),
        workers: 16,
        bulk_bytes: 256 * 1024,
        server_program: None,
    };
    load::raise_fd_limit(16_384);
    let mut bed = TestBed::builder().try_start().expect("start the test bed");
    let report = load::run(&mut bed, &plan).expect("the load ran");
    report.print();
    assert_eq!(
        report.count(Outcome::Corrupted),
        0,
        "bytes came back altered"
    );
    let unexpected = report.unexpected_failures();
    assert!(
        unexpected.is_empty(),
        "{} connections failed outside the kill: {unexpected:?}",
        unexpected.len()
    );
    let completed = |phase| {
        report
            .attempts
            .iter()
            .filter(|a| a.outcome == Outcome::Completed && a.phases == (phase, phase))
            .count()
    };
    for phase in [
        load::Phase::Steady,
        load::Phase::Roll,
        load::Phase::AfterRoll,
        load::Phase::Restarted,
    ] {
        assert!(
            completed(phase) > 0,
            "connections completed while {phase:?}"
        );
    }
    assert!(
        report
            .attempts
            .iter()
            .any(|a| a.bulk && a.outcome == Outcome::Completed),
        "bulk connections completed"
    );
    // n1's daemon ran throughout: after the load it holds what it held before it.
    let (before, after) = (report.before[0], report.after[0]);
    assert!(
        after.fds <= before.fds + 2,
        "n1's daemon holds {} descriptors after the load, {} before",
        after.fds,
        before.fds
    );
    assert!(
        report.holding[0].fds >= before.fds + plan.held,
        "the held connections were counted: {:?} then {:?}",
        before,
        report.holding[0]
    );
    let conns = bed.connections(0);
    let open = conns["connections"]
        .as_array()
        .map(Vec::len)
        .expect("the connection table is a list");
    assert_eq!(open, 0, "n1 still tracks connections: {conns}");
}
