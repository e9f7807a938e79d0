//! The capture rules of one pod: an nftables table and a policy route inside the pod's netns.
//!
//! [`pod_ruleset`] renders the table (a pure function, tested as text); [`install`] replaces it
//! in one `nft -f` transaction (atomic, idempotent: the table is declared, deleted and declared
//! again in one batch) and adds the policy route; [`check`] reads it back and compares it, rule
//! by rule, with the table as `nft` listed it right after this process's first install (every
//! pod's table is the same; `nft` renders it in its own way, so the listing is the reference);
//! [`remove`] deletes both. What the rules do, in the pod's namespace:
//! - outbound TCP not to loopback → `redirect` to 15001 (the daemon reads `SO_ORIGINAL_DST`);
//! - inbound TCP other than to 15008 → `redirect` to 15006;
//! - packets of the daemon's own sockets (mark `0x539/0xfff`) are never captured;
//! - a connection the daemon opens to the application on behalf of a remote client (marked,
//!   from the client's address with `IP_TRANSPARENT`) gets connmark `0x111`; the application's
//!   replies are marked from it and routed by `fwmark 0x111/0xfff` to a table whose only route
//!   is `local default dev lo`, so they reach the daemon's socket and the application sees the
//!   real client address;
//! - traffic from the probe address (`169.254.7.127`, or `fd7a:7475:6e6e:656c::7f` over IPv6,
//!   to which the node SNATs kubelet probes, see [`node_ruleset`]) and traffic within the pod
//!   over loopback pass uncaptured.
//!
//! Both address families are captured (the table is `inet`); the policy route is added for
//! IPv6 too when the pod has an IPv6 address ([`install`]'s `ipv6`).
//!
//! `nft` and `ip` are run as child processes spawned inside the pod's netns; one that has not
//! ended within [`CHILD_TIMEOUT`] (stuck on a kernel lock, say) is killed and the operation
//! fails, so that it does not hold the registry, and every other pod's enrollment, behind it.

use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use ztunnel_proto::hbone as consts;

use crate::net::netns::Netns;

/// The table's name, in family `inet`, in every enrolled pod.
pub const TABLE: &str = "ztunnel";
/// The node-level table (in the daemon's own netns) that SNATs probes.
pub const NODE_TABLE: &str = "ztunnel_node";
/// The address kubelet probes are SNATed to.
pub const PROBE_ADDR: &str = "169.254.7.127";
/// The address kubelet probes over IPv6 are SNATed to (a unique local address, "ztunnel" in
/// its hex digits).
pub const PROBE_ADDR6: &str = "fd7a:7475:6e6e:656c::7f";
/// The routing table of the policy route.
pub const ROUTE_TABLE: u32 = 133;
/// The priority of the policy rule.
pub const RULE_PREF: u32 = 32764;

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("cannot run {program} in the pod's netns: {source}")]
    Spawn {
        program: &'static str,
        source: std::io::Error,
    },
    #[error("{program} failed: {stderr}")]
    Failed {
        program: &'static str,
        stderr: String,
    },
    #[error("the capture table is missing or altered: {0}")]
    Altered(String),
    #[error("{program} did not end within {after:?}; killed")]
    Timeout {
        program: &'static str,
        after: Duration,
    },
}

/// How long `nft` or `ip` may run.
pub const CHILD_TIMEOUT: Duration = Duration::from_secs(10);

/// The pod's table, as `nft -f` input that replaces any previous version atomically.
pub fn pod_ruleset() -> String {
    let mark = consts::SOCKET_MARK;
    let mask = consts::MARK_MASK;
    let connmark = consts::CONNMARK;
    let out = consts::OUTBOUND_PORT;
    let inb = consts::INBOUND_PLAINTEXT_PORT;
    let hbone = consts::HBONE_PORT;
    format!(
        "table inet {TABLE}
delete table inet {TABLE}
table inet {TABLE} {{
  chain prerouting_mangle {{
    type filter hook prerouting priority mangle; policy accept;
    meta mark & {mask:#x} == {mark:#x} ct mark set ct mark & {notmask:#x} | {connmark:#x}
  }}
  chain output_mangle {{
    type route hook output priority mangle; policy accept;
    ct mark & {mask:#x} == {connmark:#x} meta mark set meta mark & {notmask:#x} | {connmark:#x}
  }}
  chain prerouting_nat {{
    type nat hook prerouting priority dstnat; policy accept;
    ip saddr {PROBE_ADDR} accept
    ip6 saddr {PROBE_ADDR6} accept
    iifname \"lo\" accept
    meta mark & {mask:#x} == {mark:#x} accept
    tcp dport {hbone} accept
    meta l4proto tcp redirect to :{inb}
  }}
  chain output_nat {{
    type nat hook output priority -100; policy accept;
    ip daddr {PROBE_ADDR} accept
    ip6 daddr {PROBE_ADDR6} accept
    meta mark & {mask:#x} == {mark:#x} accept
    meta mark & {mask:#x} == {connmark:#x} accept
    ip daddr 127.0.0.0/8 accept
    ip6 daddr ::1 accept
    oifname \"lo\" accept
    meta l4proto tcp redirect to :{out}
  }}
}}
",
        notmask = !mask,
    )
}

/// Lines that [`check`] expects in `nft list table` output before this process has installed
/// a table to compare with: the captures and the skips.
fn expected_lines() -> Vec<String> {
    vec![
        format!(
            "meta l4proto tcp redirect to :{}",
            consts::INBOUND_PLAINTEXT_PORT
        ),
        format!("meta l4proto tcp redirect to :{}", consts::OUTBOUND_PORT),
        format!("tcp dport {} accept", consts::HBONE_PORT),
        format!("ip saddr {PROBE_ADDR} accept"),
        format!("ip6 saddr {PROBE_ADDR6} accept"),
    ]
}

/// The node-level table of one address family: kubelet probes (connections the node itself
/// opens to an enrolled pod) leave with the probe address, which the pod's rules let through
/// uncaptured. Only packets the node sends itself are taken (`meta iif 0`: no input
/// interface; a kernel client's, an NFS mount's, too): a packet forwarded through the node
/// that claims one of its addresses as its source (IPv6 routes it; IPv4 drops it as a martian
/// unless `accept_local` is set) is not given the probe address.
pub fn node_ruleset(family: Family) -> String {
    let f = family.nft();
    let (addr_type, probe) = match family {
        Family::V4 => ("ipv4_addr", PROBE_ADDR),
        Family::V6 => ("ipv6_addr", PROBE_ADDR6),
    };
    format!(
        "table {f} {NODE_TABLE}
delete table {f} {NODE_TABLE}
table {f} {NODE_TABLE} {{
  set enrolled {{ type {addr_type}; }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    {f} daddr @enrolled meta l4proto tcp fib saddr type local meta iif 0 snat to {probe}
  }}
}}
"
    )
}

fn run(
    ns: &Netns,
    program: &'static str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, RulesError> {
    run_for(ns, program, args, stdin, CHILD_TIMEOUT)
}

/// [`run`], killing the child after `timeout`.
fn run_for(
    ns: &Netns,
    program: &'static str,
    args: &[&str],
    stdin: Option<&str>,
    timeout: Duration,
) -> Result<String, RulesError> {
    let spawn_err = |source| RulesError::Spawn { program, source };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = ns
        .run(|| cmd.spawn())
        .map_err(spawn_err)?
        .map_err(spawn_err)?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("piped");
        pipe.write_all(input.as_bytes()).map_err(spawn_err)?;
    }
    // Waited for on a thread of its own; the child is not reaped before it ends, so its pid
    // is still its own when it is killed.
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || drop(tx.send(child.wait_with_output())));
    let out = match rx.recv_timeout(timeout) {
        Ok(out) => out.map_err(spawn_err)?,
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            return Err(RulesError::Timeout {
                program,
                after: timeout,
            });
        }
    };
    if !out.status.success() {
        return Err(RulesError::Failed {
            program,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Adds (or, with `add` false, removes) the policy route of one address family: replies
/// marked from connmark `0x111` are routed to `lo`, to the daemon's transparent socket.
fn policy_route(ns: &Netns, family: Family, add: bool) -> Result<(), RulesError> {
    let fwmark = format!("{:#x}/{:#x}", consts::CONNMARK, consts::MARK_MASK);
    let table = ROUTE_TABLE.to_string();
    let pref = RULE_PREF.to_string();
    let ip = |args: &[&str]| {
        let mut all = vec![family.flag()];
        all.extend_from_slice(args);
        run(ns, "ip", &all, None)
    };
    let rule = |verb: &'static str| {
        ip(&[
            "rule",
            verb,
            "fwmark",
            fwmark.as_str(),
            "table",
            table.as_str(),
            "pref",
            pref.as_str(),
        ])
    };
    let present = rule("show").is_ok_and(|out| !out.trim().is_empty());
    if !add {
        if present {
            let _ = rule("del");
        }
        let _ = ip(&["route", "flush", "table", &table]);
        return Ok(());
    }
    // Never delete-and-add: replies routed in between would leave by the pod's interface.
    ip(&[
        "route",
        "replace",
        "local",
        family.any(),
        "dev",
        "lo",
        "table",
        &table,
    ])?;
    if !present {
        rule("add")?;
    }
    Ok(())
}

/// An address family of the policy route and of the node's probe table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }
    fn any(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0/0",
            Family::V6 => "::/0",
        }
    }
    /// The nftables family of the node's probe table.
    fn nft(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }
    fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// Installs (or replaces) the pod's capture: the table, the policy route (for IPv6 too when
/// `ipv6`: the pod has an IPv6 address), and `tcp_migrate_req` so a restarting daemon's
/// listeners inherit queued connections.
pub fn install(ns: &Netns, ipv6: bool) -> Result<(), RulesError> {
    run(ns, "nft", &["-f", "-"], Some(&pod_ruleset()))?;
    if INSTALLED.get().is_none() {
        if let Ok(listing) = run(ns, "nft", &["list", "table", "inet", TABLE], None) {
            let _ = INSTALLED.set(rule_lines(&listing));
        }
    }
    policy_route(ns, Family::V4, true)?;
    if ipv6 {
        policy_route(ns, Family::V6, true)?;
    }
    // Best effort: without it a rolling restart may reset connections still queued.
    let migrate = ns.run(|| std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1"));
    if let Ok(Err(e)) | Err(e) = migrate {
        tracing::debug!(error = %e, "cannot set tcp_migrate_req in the pod's netns");
    }
    Ok(())
}

/// The table as `nft` listed it right after this process's first install.
static INSTALLED: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

/// A listing's chains, hooks and rules, one per line, without indentation or blank lines.
fn rule_lines(listing: &str) -> Vec<String> {
    listing
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// How `listing` differs from the `installed` one (`None`: not yet known, then only the
/// captures and skips are looked for): the first rule added, missing or changed.
fn compare(installed: Option<&[String]>, listing: &str) -> Result<(), String> {
    let got = rule_lines(listing);
    let Some(want) = installed else {
        return match expected_lines().into_iter().find(|w| !got.contains(w)) {
            Some(w) => Err(format!("rule `{w}` is missing")),
            None => Ok(()),
        };
    };
    match want.iter().zip(&got).find(|(w, g)| w != g) {
        Some((w, g)) => Err(format!("`{g}` where the installed table has `{w}`")),
        None if got.len() > want.len() => Err(format!("`{}` added", got[want.len()])),
        None if got.len() < want.len() => Err(format!("`{}` is missing", want[got.len()])),
        None => Ok(()),
    }
}

/// Verifies the pod's table is the one installed: present, nothing added, removed or changed
/// (an `accept` slipped before a capture would let traffic past the mesh).
pub fn check(ns: &Netns) -> Result<(), RulesError> {
    let listing = run(ns, "nft", &["list", "table", "inet", TABLE], None)
        .map_err(|e| RulesError::Altered(e.to_string()))?;
    compare(INSTALLED.get().map(Vec::as_slice), &listing).map_err(RulesError::Altered)
}

/// Removes the pod's table and policy route; a missing table is not an error.
pub fn remove(ns: &Netns) -> Result<(), RulesError> {
    run(
        ns,
        "nft",
        &["-f", "-"],
        Some(&format!("table inet {TABLE}\ndelete table inet {TABLE}\n")),
    )?;
    policy_route(ns, Family::V4, false)?;
    policy_route(ns, Family::V6, false)
}

/// Installs the node-level tables in the daemon's own netns (idempotent, keeps nothing), one
/// batch per family: a node without IPv6 still gets its IPv4 table (the IPv6 one's failure is
/// logged).
pub fn install_node() -> Result<(), RulesError> {
    let install = |f| run(Netns::host(), "nft", &["-f", "-"], Some(&node_ruleset(f)));
    install(Family::V4)?;
    if let Err(e) = install(Family::V6) {
        tracing::warn!(error = %e, "cannot install the node's IPv6 probe rules; kubelet probes over IPv6 to enrolled pods will be captured");
    }
    Ok(())
}

/// Adds or removes an enrolled pod's addresses in the node's probe sets, one batch per
/// family (so that one family's failure leaves the other's done); the first error.
pub fn node_probe_set(ips: &[IpAddr], add: bool) -> Result<(), RulesError> {
    let mut first = Ok(());
    for script in probe_set_scripts(ips, add) {
        match run(Netns::host(), "nft", &["-f", "-"], Some(&script)) {
            Ok(_) => {}
            Err(RulesError::Failed { .. }) if !add => {} // already gone
            Err(e) => first = first.and(Err(e)),
        }
    }
    first
}

/// The `nft` scripts that add (or delete) `ips` in the probe sets: one per family that has
/// any.
fn probe_set_scripts(ips: &[IpAddr], add: bool) -> Vec<String> {
    let verb = if add { "add" } else { "delete" };
    [Family::V4, Family::V6]
        .into_iter()
        .filter_map(|family| {
            let of: Vec<String> = ips
                .iter()
                .filter(|ip| Family::of(ip) == family)
                .map(|ip| ip.to_string())
                .collect();
            (!of.is_empty()).then(|| {
                format!(
                    "{verb} element {} {NODE_TABLE} enrolled {{ {} }}\n",
                    family.nft(),
                    of.join(", ")
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child that does not end in time is killed and the call fails as such; one that
    /// ends in time gives its output.
    #[test]
    fn a_child_stuck_past_its_timeout_is_killed() {
        let ns = Netns::host();
        let short = Duration::from_secs(1);
        let out = run_for(ns, "sh", &["-c", "echo ok"], None, CHILD_TIMEOUT).unwrap();
        assert_eq!(out, "ok\n");
        // The child writes its pid, then hangs.
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let script = format!("echo $$ > {}; exec sleep 600", pid_file.display());
        let err = run_for(ns, "sh", &["-c", &script], None, short).unwrap_err();
        assert!(
            matches!(err, RulesError::Timeout { program: "sh", .. }),
            "{err}"
        );
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        let gone = || {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()));
            // Gone, or a zombie until its waiter reaps it.
            stat.map_or(true, |s| s.contains(") Z "))
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !gone() {
            assert!(std::time::Instant::now() < deadline, "the child still runs");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn the_pod_table_captures_and_skips_what_the_contract_says() {
        let r = pod_ruleset();
        // Atomic replacement in one batch.
        assert!(r.starts_with("table inet ztunnel\ndelete table inet ztunnel\n"));
        for want in expected_lines() {
            assert!(r.contains(&want), "missing {want}");
        }
        // The daemon's own sockets skip both nat chains, before any redirect.
        let skip = "meta mark & 0xfff == 0x539 accept";
        assert_eq!(r.matches(skip).count(), 2);
        for chain in ["prerouting_nat", "output_nat"] {
            let body = &r[r.find(chain).unwrap()..];
            assert!(
                body.find(skip).unwrap() < body.find("redirect").unwrap(),
                "{chain}"
            );
        }
        // Connmark on the way in, restored as a mark on the way out (a route chain, so the
        // changed mark re-routes the reply).
        assert!(r.contains("ct mark set ct mark & 0xfffff000 | 0x111"));
        assert!(r.contains("type route hook output"));
        assert!(r.contains("ct mark & 0xfff == 0x111 meta mark set"));
    }

    /// A listing as `nft` renders the pod's table (its own spelling of the marks).
    const LISTING: &str = "table inet ztunnel {
\tchain prerouting_nat {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tip saddr 169.254.7.127 accept
\t\tip6 saddr fd7a:7475:6e6e:656c::7f accept
\t\tmeta mark & 0x00000fff == 0x00000539 accept
\t\ttcp dport 15008 accept
\t\tmeta l4proto tcp redirect to :15006
\t}

\tchain output_nat {
\t\ttype nat hook output priority -100; policy accept;
\t\tmeta l4proto tcp redirect to :15001
\t}
}
";

    #[test]
    fn check_finds_rules_added_removed_or_changed() {
        let installed = rule_lines(LISTING);
        let edit = |from: &str, to: &str| LISTING.replacen(from, to, 1);
        // (listing, compared with the installed table, or only with the expected lines)
        let cases: Vec<(String, Option<&str>, Option<&str>)> = vec![
            (LISTING.into(), None, None),
            (LISTING.replace('\t', "    "), None, None),
            (
                edit(
                    "\t\ttcp dport 15008",
                    "\t\ttcp dport 8080 accept\n\t\ttcp dport 15008",
                ),
                Some("`tcp dport 8080 accept` where"),
                None,
            ),
            (
                edit("\t\tmeta l4proto tcp redirect to :15001\n", ""),
                Some("`}` where the installed table has `meta l4proto tcp redirect to :15001`"),
                Some("redirect to :15001` is missing"),
            ),
            (
                edit(
                    "meta mark & 0x00000fff == 0x00000539 accept",
                    "meta mark & 0x00000fff == 0x00000001 accept",
                ),
                Some("0x00000001 accept` where"),
                None,
            ),
            (
                format!("{LISTING}table inet other {{\n}}\n"),
                Some("`table inet other {` added"),
                None,
            ),
            (
                String::new(),
                Some("`table inet ztunnel {` is missing"),
                Some("is missing"),
            ),
        ];
        for (listing, want, want_lines) in cases {
            let got = compare(Some(&installed), &listing);
            match want {
                None => assert_eq!(got, Ok(()), "{listing}"),
                Some(w) => assert!(got.as_ref().is_err_and(|e| e.contains(w)), "{w}: {got:?}"),
            }
            let got = compare(None, &listing);
            match want_lines {
                None => assert_eq!(got, Ok(()), "{listing}"),
                Some(w) => assert!(got.as_ref().is_err_and(|e| e.contains(w)), "{w}: {got:?}"),
            }
        }
    }

    #[test]
    fn the_node_table_snats_only_local_connections_to_enrolled_pods() {
        let r = node_ruleset(Family::V4);
        assert!(r.starts_with("table ip ztunnel_node\ndelete table ip ztunnel_node\n"));
        assert!(r.contains(
            "ip daddr @enrolled meta l4proto tcp fib saddr type local meta iif 0 snat to 169.254.7.127"
        ));
        let r = node_ruleset(Family::V6);
        assert!(r.starts_with("table ip6 ztunnel_node\ndelete table ip6 ztunnel_node\n"));
        assert!(r.contains(
            "ip6 daddr @enrolled meta l4proto tcp fib saddr type local meta iif 0 snat to fd7a:7475:6e6e:656c::7f"
        ));
    }

    #[test]
    fn probe_set_updates_go_to_the_table_of_each_address_family() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let cases: &[(&[&str], bool, &[&str])] = &[
            (&[], true, &[]),
            (
                &["10.1.0.5"],
                true,
                &["add element ip ztunnel_node enrolled { 10.1.0.5 }\n"],
            ),
            (
                &["fd00::5", "10.1.0.5", "fd00::6"],
                false,
                &[
                    "delete element ip ztunnel_node enrolled { 10.1.0.5 }\n",
                    "delete element ip6 ztunnel_node enrolled { fd00::5, fd00::6 }\n",
                ],
            ),
        ];
        for (ips, add, want) in cases {
            let ips: Vec<IpAddr> = ips.iter().map(|s| ip(s)).collect();
            assert_eq!(probe_set_scripts(&ips, *add), *want, "{ips:?}");
        }
    }
}
