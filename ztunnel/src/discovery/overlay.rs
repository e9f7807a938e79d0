//! A state made from another by a few changes, without copying it: the changes are a small
//! [`Patch`] over the other's shared [`Base`], consulted first by every lookup. An
//! [`Overlay`] is the mutable state a source updates change by change; each
//! [`Overlay::snapshot`] publishes it as a [`State`] that shares the base and holds a copy of
//! the patch. When the patch outgrows [`PATCH_LIMIT`] entries it is folded into a new base (a
//! copy of the old one with the patch applied), so that a snapshot costs at most the patch's
//! size, and folding, linear in the state, happens once per [`PATCH_LIMIT`] changed entries.
//!
//! Invariants a source keeps (the lookups rely on them): every index (by IP, by VIP, by name,
//! an endpoint, a uid's services) names a slot that holds a workload or service; a slot given
//! up is emptied and every index to it updated before the next snapshot.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use super::model::{Base, Service, State, Workload};

/// Entries of a patch past which [`Overlay::snapshot`] folds it into a new base.
pub const PATCH_LIMIT: usize = 4096;

/// The changes of a state from its base. `None` entries are removals.
#[derive(Clone, Debug, Default)]
pub struct Patch {
    pub(super) workloads: HashMap<u32, Option<Arc<Workload>>>,
    /// One past the last slot of a workload.
    pub(super) workloads_end: u32,
    pub(super) workload_count: usize,
    pub(super) by_ip: HashMap<IpAddr, Option<u32>>,
    pub(super) by_uid: HashMap<Arc<str>, Option<Arc<Workload>>>,
    pub(super) services: HashMap<u32, Option<Arc<Service>>>,
    /// One past the last slot of a service.
    pub(super) services_end: u32,
    pub(super) service_count: usize,
    pub(super) by_vip: HashMap<IpAddr, Option<u32>>,
    /// By `<name>.<namespace>`.
    pub(super) by_name: HashMap<Box<str>, Option<u32>>,
    pub(super) endpoints: HashMap<u32, Box<[u32]>>,
    pub(super) services_of_uid: HashMap<Arc<str>, Vec<usize>>,
    pub(super) pending: Option<Vec<Arc<Workload>>>,
}

impl Patch {
    /// No change from `base`.
    fn empty(base: &Base) -> Patch {
        Patch {
            workloads_end: base.workloads.len() as u32,
            workload_count: base.workload_count,
            services_end: base.services.len() as u32,
            service_count: base.service_count,
            ..Default::default()
        }
    }

    /// Its entries.
    fn size(&self) -> usize {
        self.workloads.len()
            + self.by_ip.len()
            + self.by_uid.len()
            + self.services.len()
            + self.by_vip.len()
            + self.by_name.len()
            + self.endpoints.len()
            + self.services_of_uid.len()
            + self.pending.as_ref().map_or(0, Vec::len)
    }
}

fn name_key(s: &Service) -> Box<str> {
    format!("{}.{}", s.name, s.namespace).into()
}

/// Slot lookups of a state: its base, then its patch.
impl State {
    pub(super) fn workload_at(&self, i: u32) -> Option<&Arc<Workload>> {
        if let Some(w) = self.patch.as_ref().and_then(|p| p.workloads.get(&i)) {
            return w.as_ref();
        }
        self.base.workloads.get(i as usize)?.as_ref()
    }
    pub(super) fn slot_of_ip(&self, ip: IpAddr) -> Option<u32> {
        if let Some(i) = self.patch.as_ref().and_then(|p| p.by_ip.get(&ip)) {
            return *i;
        }
        self.base.by_ip.get(ip)
    }
    pub(super) fn service_at(&self, i: u32) -> Option<&Arc<Service>> {
        if let Some(s) = self.patch.as_ref().and_then(|p| p.services.get(&i)) {
            return s.as_ref();
        }
        self.base.services.get(i as usize)?.as_ref()
    }
    pub(super) fn slot_of_vip(&self, ip: IpAddr) -> Option<u32> {
        if let Some(i) = self.patch.as_ref().and_then(|p| p.by_vip.get(&ip)) {
            return *i;
        }
        self.base.by_vip.get(&ip).copied()
    }
    pub(super) fn endpoints_at(&self, i: u32) -> &[u32] {
        if let Some(e) = self.patch.as_ref().and_then(|p| p.endpoints.get(&i)) {
            return e;
        }
        self.base.endpoints.get(i as usize).map_or(&[], |e| e)
    }
    /// The services (slots) the workload with `uid` is an endpoint of.
    pub(super) fn services_of_uid(&self, uid: &str) -> &[usize] {
        if let Some(v) = self.patch.as_ref().and_then(|p| p.services_of_uid.get(uid)) {
            return v;
        }
        self.base.services_of_uid.get(uid).map_or(&[], |v| v)
    }
}

/// A state being changed in place: a base and the patch of the changes so far.
#[derive(Debug)]
pub struct Overlay {
    /// The current state; its patch is this overlay's own (never shared) while it changes.
    state: State,
    free_workloads: Vec<u32>,
    free_services: Vec<u32>,
    /// Patch entries past which a snapshot folds the patch ([`PATCH_LIMIT`] unless set).
    limit: usize,
}

impl Overlay {
    /// The state `state` (built by [`State::build`]), to be changed.
    pub fn new(state: State) -> Overlay {
        let base = state.base;
        let patch = match state.patch {
            Some(p) => Arc::unwrap_or_clone(p),
            None => Patch::empty(&base),
        };
        let end = patch.workloads_end;
        let free_workloads = (0..end).filter(|i| {
            patch.workloads.get(i).map_or_else(
                || base.workloads.get(*i as usize).is_some_and(Option::is_none),
                Option::is_none,
            )
        });
        let free_workloads = free_workloads.collect();
        let end = patch.services_end;
        let free_services = (0..end).filter(|i| {
            patch.services.get(i).map_or_else(
                || base.services.get(*i as usize).is_some_and(Option::is_none),
                Option::is_none,
            )
        });
        let free_services = free_services.collect();
        Overlay {
            state: State {
                base,
                patch: Some(Arc::new(patch)),
            },
            free_workloads,
            free_services,
            limit: PATCH_LIMIT,
        }
    }

    /// Folds the patch past `limit` entries instead of [`PATCH_LIMIT`].
    pub fn with_limit(mut self, limit: usize) -> Overlay {
        self.limit = limit;
        self
    }

    /// The state as it is now (lookups only: [`State`]'s methods).
    pub fn state(&self) -> &State {
        &self.state
    }

    fn patch(&mut self) -> &mut Patch {
        let p = self.state.patch.as_mut().expect("an overlay has a patch");
        Arc::get_mut(p).expect("an overlay's patch is its own")
    }

    /// The slot of workload or service in this state: an empty one.
    pub fn new_workload_slot(&mut self) -> u32 {
        if let Some(i) = self.free_workloads.pop() {
            return i;
        }
        let p = self.patch();
        p.workloads_end += 1;
        p.workloads_end - 1
    }

    pub fn new_service_slot(&mut self) -> u32 {
        if let Some(i) = self.free_services.pop() {
            return i;
        }
        let p = self.patch();
        p.services_end += 1;
        p.services_end - 1
    }

    /// Puts `w` in slot `i` (`None`: empties it, and the slot may be given again).
    pub fn set_workload(&mut self, i: u32, w: Option<Arc<Workload>>) {
        let had = self.state.workload_at(i).is_some();
        let has = w.is_some();
        let p = self.patch();
        p.workloads.insert(i, w);
        p.workload_count = p.workload_count + has as usize - had as usize;
        if had && !has {
            self.free_workloads.push(i);
        }
    }

    /// Maps `ip` to workload slot `i`, or to none.
    pub fn set_ip(&mut self, ip: IpAddr, i: Option<u32>) {
        self.patch().by_ip.insert(ip, i);
    }

    /// Unmaps `ip` if it names slot `i`.
    pub fn unset_ip(&mut self, ip: IpAddr, i: u32) {
        if self.state.slot_of_ip(ip) == Some(i) {
            self.set_ip(ip, None);
        }
    }

    pub fn set_uid(&mut self, uid: Arc<str>, w: Option<Arc<Workload>>) {
        self.patch().by_uid.insert(uid, w);
    }

    /// Puts `s` in service slot `i` (`None`: empties it), with its VIPs and name indexed
    /// (and those of the service it replaces no longer).
    pub fn set_service(&mut self, i: u32, s: Option<Arc<Service>>) {
        let old = self.state.service_at(i).cloned();
        if let Some(old) = &old {
            for v in &old.vips {
                if self.state.slot_of_vip(*v) == Some(i) {
                    self.patch().by_vip.insert(*v, None);
                }
            }
            let key = name_key(old);
            if self.state.service_by_hostname_key(&key) == Some(i) {
                self.patch().by_name.insert(key, None);
            }
        }
        let (had, has) = (old.is_some(), s.is_some());
        if let Some(s) = &s {
            for v in &s.vips {
                self.patch().by_vip.insert(*v, Some(i));
            }
            self.patch().by_name.insert(name_key(s), Some(i));
        }
        let p = self.patch();
        p.services.insert(i, s);
        p.service_count = p.service_count + has as usize - had as usize;
        if had && !has {
            p.endpoints.insert(i, Box::default());
            self.free_services.push(i);
        }
    }

    pub fn set_endpoints(&mut self, i: u32, endpoints: Box<[u32]>) {
        self.patch().endpoints.insert(i, endpoints);
    }

    /// The services (slots) the workload with `uid` is an endpoint of, now.
    pub fn services_of_uid(&self, uid: &str) -> &[usize] {
        self.state.services_of_uid(uid)
    }

    pub fn set_services_of_uid(&mut self, uid: Arc<str>, services: Vec<usize>) {
        self.patch().services_of_uid.insert(uid, services);
    }

    pub fn set_pending(&mut self, pending: Vec<Arc<Workload>>) {
        self.patch().pending = Some(pending);
    }

    /// The state as it is now, to publish. Folds the patch into a new base first when it has
    /// grown past its limit.
    pub fn snapshot(&mut self) -> State {
        if self
            .state
            .patch
            .as_ref()
            .is_some_and(|p| p.size() > self.limit)
        {
            let base = fold(&self.state.base, self.state.patch.as_ref().unwrap());
            self.state = State {
                patch: Some(Arc::new(Patch::empty(&base))),
                base: Arc::new(base),
            };
        }
        let (base, patch) = (&self.state.base, self.state.patch.as_ref().unwrap());
        let changed = patch.size() > 0
            || patch.workloads_end as usize != base.workloads.len()
            || patch.services_end as usize != base.services.len();
        State {
            base: base.clone(),
            patch: changed.then(|| Arc::new((**patch).clone())),
        }
    }
}

impl State {
    /// The slot of the service named by `<name>.<namespace>`.
    pub(super) fn service_by_hostname_key(&self, key: &str) -> Option<u32> {
        if let Some(i) = self.patch.as_ref().and_then(|p| p.by_name.get(key)) {
            return *i;
        }
        let (name, ns) = key.split_once('.')?;
        let b = &self.base;
        let at = b
            .services_by_name
            .binary_search_by(|&i| {
                let s = b.services[i as usize].as_ref().expect("indexed");
                (&*s.namespace, &*s.name).cmp(&(ns, name))
            })
            .ok()?;
        Some(b.services_by_name[at])
    }
}

/// `base` with `patch` applied.
fn fold(base: &Base, patch: &Patch) -> Base {
    let mut workloads = base.workloads.clone();
    workloads.resize(patch.workloads_end as usize, None);
    for (i, w) in &patch.workloads {
        workloads[*i as usize] = w.clone();
    }
    let mut by_ip = base.by_ip.clone();
    for (ip, i) in &patch.by_ip {
        match i {
            Some(i) => {
                by_ip.insert(*ip, *i);
            }
            None => by_ip.remove(*ip),
        }
    }
    let mut by_uid = base.by_uid.clone();
    for (uid, w) in &patch.by_uid {
        match w {
            Some(w) => by_uid.insert(uid.clone(), w.clone()),
            None => by_uid.remove(uid),
        };
    }
    let mut services = base.services.clone();
    services.resize(patch.services_end as usize, None);
    for (i, s) in &patch.services {
        services[*i as usize] = s.clone();
    }
    let mut endpoints = base.endpoints.clone();
    endpoints.resize(patch.services_end as usize, Box::default());
    for (i, e) in &patch.endpoints {
        endpoints[*i as usize] = e.clone();
    }
    let mut by_vip = base.by_vip.clone();
    for (ip, i) in &patch.by_vip {
        match i {
            Some(i) => by_vip.insert(*ip, *i),
            None => by_vip.remove(ip),
        };
    }
    let mut services_of_uid = base.services_of_uid.clone();
    for (uid, v) in &patch.services_of_uid {
        match v.is_empty() {
            false => services_of_uid.insert(uid.clone(), v.clone()),
            true => services_of_uid.remove(uid),
        };
    }
    Base {
        trust_domain: base.trust_domain.clone(),
        namespaces: base.namespaces.clone(),
        workloads,
        workload_count: patch.workload_count,
        by_ip,
        by_uid,
        services_by_name: Base::sorted_by_name(&services),
        services,
        service_count: patch.service_count,
        by_vip,
        endpoints,
        services_of_uid,
        policies: base.policies.clone(),
        pending: patch
            .pending
            .clone()
            .unwrap_or_else(|| base.pending.clone()),
        enrollment: base.enrollment,
    }
}
