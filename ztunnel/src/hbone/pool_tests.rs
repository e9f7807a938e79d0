//! The pool's pure decisions: which destinations QUIC is tried for, and when again.

use std::time::{Duration, Instant};

use super::{quic_due, QuicSettings, QUIC_RETRY_AFTER};

#[test]
fn quic_destinations_match_by_cidr_and_ip() {
    let q = QuicSettings {
        destinations: vec![
            "10.20.0.0/16".parse().unwrap(),
            "fd00::7/128".parse().unwrap(),
        ],
    };
    let cases = [
        ("10.20.2.10:15008", true),
        ("[::ffff:10.20.2.10]:15008", true),
        ("10.21.0.1:15008", false),
        ("[fd00::7]:15008", true),
        ("[fd00::8]:15008", false),
    ];
    for (addr, want) in cases {
        assert_eq!(q.wants(addr.parse().unwrap()), want, "{addr}");
    }
    assert!(!QuicSettings::default().wants("10.20.2.10:15008".parse().unwrap()));
}

#[test]
fn an_unanswered_destination_is_retried_on_quic_after_the_period() {
    let t = Instant::now();
    let cases = [
        (None, Duration::ZERO, true),
        (Some(t), Duration::ZERO, false),
        (Some(t), QUIC_RETRY_AFTER - Duration::from_millis(1), false),
        (Some(t), QUIC_RETRY_AFTER, true),
    ];
    for (at, later, want) in cases {
        assert_eq!(quic_due(at, t + later), want, "{at:?} +{later:?}");
    }
}
