//! The registry through its handle ([`Pods`]), on a recording fake dataplane: operations on
//! a pod are applied one after another, DEL is idempotent, a pod comes back after its DEL, and
//! the reconciler's and CNI's attachments of one pod hand over to each other.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

use futures::executor::block_on;
use parking_lot::Mutex;
use ztunnel_proto::enroll::{Attachment, ErrorKind, PodAdd, PodDel, PodRef, Reply, Request};

use super::annotate::{Annotator, Status};
use super::pods::Pods;
use super::registry::{
    is_reconciled, reconciled_attachment, same_pod, Context, Dataplane, EnrollError, Registry,
};
use super::rules::RulesError;
use super::store::{PodRecord, Store};
use crate::discovery::{Discovery, Workload};
use crate::metrics::Metrics;

const MESH: &str = "
trustDomain: cluster.local
namespaces:
  - {name: demo, labels: {ztunnel.dev/dataplane-mode: ambient}}
workloads:
  - {uid: u1, name: web-0, namespace: demo, serviceAccount: web, node: n1, ips: [10.0.0.1]}
";

type Log = Arc<Mutex<Vec<String>>>;

/// A netns of the fake: a file, named by its file name, identified by its (device, inode).
struct FakeNs {
    name: String,
    id: (u64, u64),
}

struct Serving {
    ns: String,
    on: AtomicBool,
}

/// Records what it is asked to do, in order.
struct Fake {
    log: Log,
    /// Taken by the next `prepare`, which says it got there and then waits for the go.
    gate: Mutex<Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>>,
    /// The next `prepare` panics.
    panic: Arc<AtomicBool>,
    /// [`PREPARE_FAILS`]: every `prepare` fails; [`OPEN_FAILS`]: the next `open` fails.
    fail: Arc<AtomicUsize>,
}

const PREPARE_FAILS: usize = 1;
const OPEN_FAILS: usize = 2;

impl Fake {
    fn note(&self, what: String) {
        self.log.lock().push(what);
    }
}

impl Dataplane for Fake {
    type Netns = FakeNs;
    type Bound = ();
    type Serving = Serving;

    fn open(&self, path: &Path) -> std::io::Result<FakeNs> {
        use std::os::unix::fs::MetadataExt;
        let once = self
            .fail
            .compare_exchange(OPEN_FAILS, 0, Ordering::SeqCst, Ordering::SeqCst);
        if once.is_ok() {
            return Err(std::io::Error::other("too many open files"));
        }
        let m = std::fs::metadata(path)?;
        Ok(FakeNs {
            name: path.file_name().unwrap().to_string_lossy().into(),
            id: (m.dev(), m.ino()),
        })
    }
    fn id(&self, ns: &FakeNs) -> (u64, u64) {
        ns.id
    }
    fn prepare(&self, ns: &FakeNs, _ipv6: bool) -> Result<(), EnrollError> {
        if self.panic.swap(false, Ordering::SeqCst) {
            panic!("the fake's prepare panics, as asked");
        }
        if self.fail.load(Ordering::SeqCst) == PREPARE_FAILS {
            return Err(EnrollError::Listen(std::io::Error::other(
                "no file descriptors",
            )));
        }
        if let Some((there, go)) = self.gate.lock().take() {
            there.send(()).unwrap();
            go.recv().unwrap();
        }
        self.note(format!("prepare {}", ns.name));
        Ok(())
    }
    fn serve(&self, ns: &FakeNs, w: &Workload, _: ()) -> Serving {
        self.note(format!("serve {} as {}", ns.name, w.uid));
        Serving {
            ns: ns.name.clone(),
            on: AtomicBool::new(true),
        }
    }
    fn stop(&self, s: &Serving) {
        s.on.store(false, Ordering::SeqCst);
        self.note(format!("stop {}", s.ns));
    }
    fn is_serving(&self, s: &Serving) -> bool {
        s.on.load(Ordering::SeqCst)
    }
    fn close_connections(&self, ns: &FakeNs, _: &[std::net::IpAddr]) {
        self.note(format!("close {}", ns.name));
    }
    fn remove_rules(&self, ns: &FakeNs) -> Result<(), RulesError> {
        self.note(format!("remove-rules {}", ns.name));
        Ok(())
    }
    fn check_rules(&self, _: &FakeNs) -> Result<(), RulesError> {
        Ok(())
    }
    fn probe_set(&self, _: &[std::net::IpAddr], _: bool) -> Result<(), RulesError> {
        Ok(())
    }
    /// A netns whose file is named `reused-…` stands for one that no longer holds the pod
    /// (its pid reused by another process).
    fn still_the_pods(&self, r: &PodRecord) -> bool {
        let name = r.netns.file_name().unwrap_or_default().to_string_lossy();
        !name.starts_with("reused-")
    }
}

#[derive(Default)]
struct Notes(Mutex<Vec<(String, Status)>>);

impl Annotator for Notes {
    fn annotate(&self, pod: &PodRef, status: Status) {
        self.0.lock().push((pod.name.clone(), status));
    }
    fn certificate(&self, _: &PodRef, _: Option<String>) {}
}

struct Bed {
    pods: Pods,
    log: Log,
    notes: Arc<Notes>,
    metrics: Arc<Metrics>,
    store: Store,
    panic: Arc<AtomicBool>,
    dir: tempfile::TempDir,
}

impl Bed {
    fn new() -> Bed {
        Bed::with_gate(None)
    }

    fn with_gate(gate: Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>) -> Bed {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state")).unwrap();
        let log = Log::default();
        let notes = Arc::new(Notes::default());
        let metrics = Arc::new(Metrics::default());
        let panic = Arc::new(AtomicBool::new(false));
        let fake = Fake {
            log: log.clone(),
            gate: Mutex::new(gate),
            panic: panic.clone(),
            fail: Arc::default(),
        };
        let cx = Context {
            discovery: Discovery::fixed(crate::discovery::parse(MESH, "cluster.local").unwrap()),
            node: "n1".into(),
            trust_domain: "cluster.local".into(),
            metrics: metrics.clone(),
            store: store.clone(),
            annotator: notes.clone(),
        };
        let (_, ready) = tokio::sync::watch::channel(true);
        let pods = Pods::start(Registry::new(fake, cx), ready).unwrap();
        Bed {
            pods,
            log,
            notes,
            metrics,
            store,
            panic,
            dir,
        }
    }

    /// A netns of the fake: a file in the bed's directory.
    fn ns(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, b"").unwrap();
        path
    }

    fn ns_id(path: &Path) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).unwrap();
        (m.dev(), m.ino())
    }

    /// What the dataplane was asked to do since the last call.
    fn events(&self) -> Vec<String> {
        std::mem::take(&mut *self.log.lock())
    }

    fn notes(&self) -> Vec<(String, Status)> {
        std::mem::take(&mut *self.notes.0.lock())
    }

    fn call(&self, req: Request) -> Reply {
        block_on(self.pods.handle(req))
    }

    /// The attachments held, sorted.
    fn held(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .pods
            .list()
            .into_iter()
            .map(|e| e.attachment.container_id)
            .collect();
        v.sort();
        v
    }

    /// The attachments recorded on the node, sorted.
    fn recorded(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .store
            .load_all()
            .unwrap()
            .into_iter()
            .map(|r| r.attachment.container_id)
            .collect();
        v.sort();
        v
    }

    fn gauge(&self) -> i64 {
        self.metrics.enrolled_pods.get()
    }
}

fn web0() -> PodRef {
    PodRef {
        namespace: "demo".into(),
        name: "web-0".into(),
        uid: "u1".into(),
    }
}

fn attachment(id: &str) -> Attachment {
    Attachment {
        container_id: id.into(),
        ifname: "eth0".into(),
    }
}

fn add(id: &str, netns: &Path) -> PodAdd {
    PodAdd {
        attachment: attachment(id),
        netns: netns.display().to_string(),
        pod: web0(),
        ips: vec!["10.0.0.1".parse().unwrap()],
    }
}

fn del(id: &str, netns: &str, pod: Option<PodRef>) -> PodDel {
    PodDel {
        attachment: attachment(id),
        netns: netns.into(),
        pod,
    }
}

fn workload() -> Arc<Workload> {
    let s = crate::discovery::parse(MESH, "cluster.local").unwrap();
    s.workload_by_uid("u1").unwrap().clone()
}

#[test]
fn a_del_sent_while_the_add_of_its_pod_runs_is_applied_after_it() {
    let (there_tx, there) = mpsc::channel();
    let (go, go_rx) = mpsc::channel();
    let bed = Bed::with_gate(Some((there_tx, go_rx)));
    let ns = bed.ns("ns-a");
    let adding = bed.pods.handle(Request::Add(add("c1", &ns)));
    // The ADD is inside the dataplane (its rules being installed) when the DEL is sent.
    there.recv().unwrap();
    let deleting = bed.pods.handle(Request::Del(del(
        "c1",
        &ns.display().to_string(),
        Some(web0()),
    )));
    go.send(()).unwrap();
    assert_eq!(block_on(adding), Reply::Enrolled);
    assert_eq!(block_on(deleting), Reply::Ok);
    // The DEL found the pod the ADD enrolled and released it in full: had it run beside
    // the ADD, it would have found nothing and left the pod enrolled.
    assert_eq!(
        bed.events(),
        [
            "prepare ns-a",
            "serve ns-a as u1",
            "stop ns-a",
            "close ns-a",
            "remove-rules ns-a"
        ]
    );
    assert!(bed.held().is_empty());
    assert!(bed.recorded().is_empty());
    assert_eq!(bed.gauge(), 0);
    assert_eq!(
        bed.notes(),
        [
            ("web-0".to_string(), Status::Enrolled),
            ("web-0".to_string(), Status::Released)
        ]
    );
}

#[test]
fn a_del_of_a_pod_not_enrolled_succeeds_and_does_nothing() {
    let bed = Bed::new();
    let ns = bed.ns("ns-a");
    for req in [
        del("never", "", None),
        del("never", "/nonexistent/netns", Some(web0())),
        del("never", &ns.display().to_string(), Some(web0())),
    ] {
        assert_eq!(bed.call(Request::Del(req)), Reply::Ok);
    }
    assert!(bed.events().is_empty());
    assert!(bed.notes().is_empty());
    // And a second DEL of a pod released by the first.
    assert_eq!(bed.call(Request::Add(add("c1", &ns))), Reply::Enrolled);
    let d = del("c1", &ns.display().to_string(), Some(web0()));
    assert_eq!(bed.call(Request::Del(d.clone())), Reply::Ok);
    bed.events();
    bed.notes();
    assert_eq!(bed.call(Request::Del(d)), Reply::Ok);
    assert!(bed.events().is_empty());
    assert!(bed.notes().is_empty());
    assert!(bed.held().is_empty());
}

#[test]
fn a_pod_added_again_after_its_del_is_served_again() {
    let bed = Bed::new();
    let ns = bed.ns("ns-a");
    let path = ns.display().to_string();
    assert_eq!(bed.call(Request::Add(add("c1", &ns))), Reply::Enrolled);
    assert_eq!(
        bed.call(Request::Del(del("c1", &path, Some(web0())))),
        Reply::Ok
    );
    bed.events();
    assert_eq!(bed.call(Request::Add(add("c1", &ns))), Reply::Enrolled);
    assert_eq!(bed.events(), ["prepare ns-a", "serve ns-a as u1"]);
    assert_eq!(bed.held(), ["c1"]);
    assert_eq!(bed.recorded(), ["c1"]);
    assert_eq!(bed.gauge(), 1);
    assert_eq!(bed.call(Request::Check(add("c1", &ns))), Reply::Ok);
    // A repeated ADD replaces the listeners; the rules are replaced, never removed.
    assert_eq!(bed.call(Request::Add(add("c1", &ns))), Reply::Enrolled);
    assert_eq!(
        bed.events(),
        ["stop ns-a", "prepare ns-a", "serve ns-a as u1"]
    );
    assert_eq!(bed.held(), ["c1"]);
    assert_eq!(bed.gauge(), 1);
}

#[test]
fn a_cni_add_takes_over_the_reconcilers_attachment_of_its_pod() {
    let bed = Bed::new();
    let (a, b) = (bed.ns("ns-a"), bed.ns("ns-b"));
    let reconciled = reconciled_attachment("u1").container_id;
    let w = workload();
    assert!(bed.pods.enroll_found(&w, &a, Bed::ns_id(&a)).unwrap());
    assert_eq!(bed.held(), [reconciled.as_str()]);
    assert_eq!(bed.recorded(), [reconciled.as_str()]);
    // Found again: enrolled already.
    assert!(!bed.pods.enroll_found(&w, &a, Bed::ns_id(&a)).unwrap());
    // CHECK of the pod under the runtime's attachment finds the reconciler's.
    assert_eq!(bed.call(Request::Check(add("c1", &a))), Reply::Ok);
    bed.events();

    // ADD in the same netns: the reconciler's listeners stop, its rules stay (replaced
    // atomically by the ADD's), its record goes.
    assert_eq!(bed.call(Request::Add(add("c1", &a))), Reply::Enrolled);
    assert_eq!(
        bed.events(),
        ["stop ns-a", "prepare ns-a", "serve ns-a as u1"]
    );
    assert_eq!(bed.held(), ["c1"]);
    assert_eq!(bed.recorded(), ["c1"]);
    assert_eq!(bed.gauge(), 1);
    // The reconciler finds the pod enrolled, by CNI now.
    assert!(!bed.pods.enroll_found(&w, &a, Bed::ns_id(&a)).unwrap());
    assert_eq!(
        bed.call(Request::Del(del(
            "c1",
            &a.display().to_string(),
            Some(web0())
        ))),
        Reply::Ok
    );
    assert!(bed.held().is_empty());
    bed.events();

    // ADD in another netns (a new sandbox): the reconciler's one is released in full.
    assert!(bed.pods.enroll_found(&w, &a, Bed::ns_id(&a)).unwrap());
    bed.events();
    assert_eq!(bed.call(Request::Add(add("c2", &b))), Reply::Enrolled);
    assert_eq!(
        bed.events(),
        [
            "stop ns-a",
            "close ns-a",
            "remove-rules ns-a",
            "prepare ns-b",
            "serve ns-b as u1"
        ]
    );
    assert_eq!(bed.held(), ["c2"]);
    assert_eq!(bed.recorded(), ["c2"]);
}

#[test]
fn a_cni_del_releases_the_reconcilers_attachment_of_its_pod_and_gc_leaves_it() {
    let bed = Bed::new();
    let a = bed.ns("ns-a");
    let path = a.display().to_string();
    let w = workload();
    let reconciled = reconciled_attachment("u1").container_id;
    // A path that names another namespace now is refused.
    let b = bed.ns("ns-b");
    assert!(matches!(
        bed.pods.enroll_found(&w, &a, Bed::ns_id(&b)),
        Err(EnrollError::Netns { .. })
    ));
    assert!(bed.held().is_empty());

    assert!(bed.pods.enroll_found(&w, &a, Bed::ns_id(&a)).unwrap());
    // GC: the runtime does not know the reconciler's attachments.
    assert_eq!(bed.call(Request::Gc { valid: vec![] }), Reply::Ok);
    assert_eq!(bed.held(), [reconciled.as_str()]);
    bed.events();
    bed.notes();

    // DEL by pod (under an attachment the registry does not hold).
    assert_eq!(
        bed.call(Request::Del(del("c9", "", Some(web0())))),
        Reply::Ok
    );
    assert_eq!(
        bed.events(),
        ["stop ns-a", "close ns-a", "remove-rules ns-a"]
    );
    assert_eq!(bed.notes(), [("web-0".to_string(), Status::Released)]);
    assert!(bed.held().is_empty());
    assert!(bed.recorded().is_empty());

    // DEL by netns only.
    assert!(bed.pods.enroll_found(&w, &a, Bed::ns_id(&a)).unwrap());
    assert_eq!(bed.call(Request::Del(del("c9", &path, None))), Reply::Ok);
    assert!(bed.held().is_empty());
    assert_eq!(bed.gauge(), 0);

    // The reconciler's own release.
    assert!(bed.pods.enroll_found(&w, &a, Bed::ns_id(&a)).unwrap());
    assert!(bed.pods.release_attachment(&reconciled_attachment("u1")));
    assert!(!bed.pods.release_attachment(&reconciled_attachment("u1")));
    assert!(bed.held().is_empty());
}

#[test]
fn a_panic_fails_its_own_operation_only() {
    let bed = Bed::new();
    let ns = bed.ns("ns-a");
    bed.panic.store(true, Ordering::SeqCst);
    match bed.call(Request::Add(add("c1", &ns))) {
        Reply::Error { kind, .. } => assert_eq!(kind, ErrorKind::TryAgain),
        other => panic!("{other:?}"),
    }
    assert_eq!(bed.call(Request::Add(add("c1", &ns))), Reply::Enrolled);
    assert_eq!(bed.held(), ["c1"]);
}

#[test]
fn recovery_serves_the_recorded_pods_again() {
    let bed = Bed::new();
    let ns = bed.ns("ns-a");
    assert_eq!(bed.call(Request::Add(add("c1", &ns))), Reply::Enrolled);
    // A record whose netns is gone is forgotten.
    let mut gone = bed.store.load_all().unwrap().remove(0);
    gone.attachment = attachment("c2");
    gone.netns = bed.dir.path().join("gone");
    bed.store.save(&gone).unwrap();
    // A second registry on the same records, as a restarted daemon.
    let again = restarted(&bed, Log::default());
    assert_eq!(block_on(again.recover()), 1);
    let held: Vec<String> = again
        .list()
        .into_iter()
        .map(|e| e.attachment.container_id)
        .collect();
    assert_eq!(held, ["c1"]);
    assert_eq!(bed.recorded(), ["c1"]);
}

/// A second registry on `bed`'s records, as a restarted daemon's, its fake noting in `log`.
fn restarted(bed: &Bed, log: Log) -> Pods {
    restarted_with(bed, log, Arc::default(), Arc::new(Metrics::default()))
}

/// [`restarted`], its fake failing as `fail` says, counting in `metrics`.
fn restarted_with(bed: &Bed, log: Log, fail: Arc<AtomicUsize>, metrics: Arc<Metrics>) -> Pods {
    let fake = Fake {
        log,
        gate: Mutex::new(None),
        panic: Arc::default(),
        fail,
    };
    let cx = Context {
        discovery: Discovery::fixed(crate::discovery::parse(MESH, "cluster.local").unwrap()),
        node: "n1".into(),
        trust_domain: "cluster.local".into(),
        metrics,
        store: bed.store.clone(),
        annotator: Arc::new(Notes::default()),
    };
    let (_, ready) = tokio::sync::watch::channel(true);
    Pods::start(Registry::new(fake, cx), ready).unwrap()
}

/// At a restart, a recorded pod that is still enrolled but cannot be served (its listeners
/// fail, or discovery does not know it yet) keeps its rules and its record, counted; one that
/// is no longer enrolled is released.
#[test]
fn recovery_never_strips_the_rules_of_a_pod_it_cannot_serve() {
    // (the recorded pod, how the fake fails, whether it is released)
    let unknown = PodRef {
        uid: "u9".into(),
        ..web0()
    };
    let elsewhere = PodRef {
        namespace: "plain".into(),
        name: "old".into(),
        uid: "u8".into(),
    };
    let cases = [
        (web0(), PREPARE_FAILS, false),
        (web0(), OPEN_FAILS, false),
        (unknown, 0, false),
        (elsewhere, 0, true),
    ];
    for (pod, fails, released) in cases {
        let bed = Bed::new();
        let ns = bed.ns("ns-a");
        assert_eq!(bed.call(Request::Add(add("c1", &ns))), Reply::Enrolled);
        let mut r = bed.store.load_all().unwrap().remove(0);
        r.pod = pod.clone();
        bed.store.save(&r).unwrap();
        let (log, metrics) = (Log::default(), Arc::new(Metrics::default()));
        let fail = Arc::new(AtomicUsize::new(fails));
        let again = restarted_with(&bed, log.clone(), fail, metrics.clone());
        assert_eq!(block_on(again.recover()), 0, "{pod:?}");
        let stripped = log.lock().iter().any(|l| l.starts_with("remove-rules"));
        assert_eq!(stripped, released, "{pod:?}: {:?}", log.lock());
        let kept: &[&str] = if released { &[] } else { &["c1"] };
        assert_eq!(bed.recorded(), kept, "{pod:?}");
        let labels = crate::metrics::ReasonLabels {
            reason: crate::refusal::Reason::EnrollmentFailed.label(),
        };
        let counted = metrics.refusals.get_or_create(&labels).get();
        assert_eq!(counted, u64::from(!released), "{pod:?}");
    }
}

/// A reconciler record is served again only while its netns is still the pod's: one whose
/// netns now belongs to another process is forgotten, its namespace left untouched.
#[test]
fn recovery_serves_a_reconciled_pod_again_only_in_its_own_netns() {
    for (netns, served) in [("pod-ns", true), ("reused-ns", false)] {
        let bed = Bed::new();
        let ns = bed.ns(netns);
        assert_eq!(bed.call(Request::Add(add("c1", &ns))), Reply::Enrolled);
        // The record as the reconciler writes it (its attachment names the pod's uid).
        let mut r = bed.store.load_all().unwrap().remove(0);
        bed.store.remove(&r.attachment).unwrap();
        r.attachment = reconciled_attachment(&r.pod.uid);
        bed.store.save(&r).unwrap();
        let log = Log::default();
        let again = restarted(&bed, log.clone());
        assert_eq!(block_on(again.recover()), usize::from(served), "{netns}");
        let touched = log.lock().iter().any(|l| l.contains(netns));
        assert_eq!(touched, served, "{netns}: {:?}", log.lock());
        assert_eq!(bed.recorded().len(), usize::from(served), "{netns}");
    }
}

#[test]
fn same_pod_by_uid_else_by_name() {
    let pod = |ns: &str, name: &str, uid: &str| PodRef {
        namespace: ns.into(),
        name: name.into(),
        uid: uid.into(),
    };
    let cases = [
        (pod("a", "x", "u1"), pod("a", "x", "u1"), true),
        (pod("a", "x", "u1"), pod("a", "x", "u2"), false), // recreated under the same name
        (pod("a", "x", "u1"), pod("b", "y", "u1"), true),
        (pod("a", "x", ""), pod("a", "x", "u1"), true),
        (pod("a", "x", ""), pod("b", "x", ""), false),
        (pod("", "", ""), pod("", "", ""), false),
    ];
    for (a, b, want) in cases {
        assert_eq!(same_pod(&a, &b), want, "{a:?} {b:?}");
        assert!(is_reconciled(&reconciled_attachment(&a.uid)));
    }
}
