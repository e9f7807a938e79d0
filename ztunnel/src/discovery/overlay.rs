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

use super::model::{Base, Patch, Service, State, Workload};

/// Entries of a patch past which [`Overlay::snapshot`] folds it into a new base.
pub const PATCH_LIMIT: usize = 4096;

/// The key of `s` in a patch's index by name.
fn name_key(s: &Service) -> Box<str> {
    format!("{}.{}", s.name, s.namespace).into()
}

/// The empty slots below `end`: those the patch empties, and the base's empty ones that the
/// patch leaves alone.
fn free_slots<T>(patch: &HashMap<u32, Option<T>>, base: &[Option<T>], end: u32) -> Vec<u32> {
    (0..end)
        .filter(|i| {
            patch.get(i).map_or_else(
                || base.get(*i as usize).is_some_and(Option::is_none),
                Option::is_none,
            )
        })
        .collect()
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
        let free_workloads = free_slots(&patch.workloads, &base.workloads, patch.workloads_end);
        let free_services = free_slots(&patch.services, &base.services, patch.services_end);
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
        all_namespaces: base.all_namespaces,
        contested: base.contested.clone(),
        waypoints: base.waypoints.clone(),
        entries: base.entries.clone(),
    }
}
