//! Load and faults on the two-node test bed, the long variant ([`ztunnel_e2e::load`]): holds
//! `HELD` connections at once (default 10 000), then churns connections for `SECONDS` (default
//! 300) with `WORKERS` in flight (default 32) while n2's daemon is rolled and then killed and
//! restarted; prints connections held and checked, the churn's outcomes by phase, and each
//! daemon's memory and descriptors before, while holding, and after.
//! Run as root: `cargo run -p ztunnel-e2e --bin ztunnel-load --release -- [HELD] [SECONDS] [WORKERS]`.

use std::time::Duration;

use anyhow::Result;
use ztunnel_e2e::load::{self, Plan};
use ztunnel_e2e::testbed::TestBed;

fn main() -> Result<()> {
    if std::env::args().nth(1).as_deref() == Some("echo-server") {
        let port = std::env::args().nth(2).unwrap_or_default().parse()?;
        return load::serve_echo(port);
    }
    let arg = |i: usize, d: u64| -> Result<u64> {
        Ok(std::env::args()
            .nth(i)
            .map(|a| a.parse())
            .transpose()?
            .unwrap_or(d))
    };
    let plan = Plan {
        held: arg(1, 10_000)? as usize,
        churn: Duration::from_secs(arg(2, 300)?),
        workers: arg(3, 32)? as usize,
        bulk_bytes: 1 << 20,
        server_program: Some(std::env::current_exe()?),
    };
    load::raise_fd_limit(4 * plan.held as u64 + 4096);
    let mut bed = TestBed::builder().try_start()?;
    println!("{plan:?}");
    let report = load::run(&mut bed, &plan)?;
    report.print();
    let unexpected = report.unexpected_failures();
    if report.count(load::Outcome::Corrupted) > 0 || !unexpected.is_empty() {
        println!("the daemons' warnings:\n{}", load::warnings(&bed));
        anyhow::bail!(
            "{} failures outside the kill, {} corrupted",
            unexpected.len(),
            report.count(load::Outcome::Corrupted)
        );
    }
    Ok(())
}
