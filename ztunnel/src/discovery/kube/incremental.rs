//! The Kubernetes source's model kept up to date change by change ([`Engine`]): what a
//! batch of store changes ([`Changes`]) costs is in proportion to the objects it changes and
//! to those they touch, not to the cluster.
//!
//! Each pod, service or EndpointSlice changed is translated by the same functions as
//! [`translate::build`] ([`translate::pod_outcome`], [`translate::service_outcome`]), and the
//! model (`Overlay`) is updated where it depends on it: the pod's workload and its IPs, the
//! services whose EndpointSlices list those IPs ready or whose VIP is one of them, the services
//! sharing a changed service's VIPs, a changed slice's services, and the services of this
//! node's workloads (by uid). The result is the state a full [`translate::build`] of the same
//! store gives, up to the order of [`State::workloads`] and [`State::services`].
//!
//! Rebuilt in full (as rare as they are broad): the first state; a re-list; a change of a
//! namespace, a node, a policy, a Gateway, a GatewayClass, a ServiceEntry or a
//! WorkloadEntry; a pod change touching an IP
//! claimed by two pods (which both lose it, or regain it) or a uid claimed by two pods of this
//! node; and every change after a full build failed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use super::objects::{Key, PodEntry, ServiceEntry, SliceEntry};
use super::translate::{self, Of, PodOutcome, Store};
use crate::discovery::enrollment::Rules;
use crate::discovery::overlay::Overlay;
use crate::discovery::{Error, State, Workload};

/// The objects changed in the store since the last update, each with its entry before the
/// first of those changes (`None`: it was not there).
#[derive(Debug, Default)]
pub struct Changes {
    /// A change that asks for a full rebuild.
    pub full: bool,
    /// By (on this node, key).
    pub pods: HashMap<(bool, Key), Option<PodEntry>>,
    pub services: HashMap<Key, Option<ServiceEntry>>,
    pub slices: HashMap<Key, Option<SliceEntry>>,
}

impl Changes {
    pub fn pod(&mut self, local: bool, key: Key, old: Option<PodEntry>) {
        self.pods.entry((local, key)).or_insert(old);
    }
    pub fn service(&mut self, key: Key, old: Option<ServiceEntry>) {
        self.services.entry(key).or_insert(old);
    }
    pub fn slice(&mut self, key: Key, old: Option<SliceEntry>) {
        self.slices.entry(key).or_insert(old);
    }
}

/// A change that the engine does not follow incrementally.
struct Full;

/// The model and what it needs to follow changes.
pub struct Engine {
    trust_domain: String,
    node: String,
    rules: Rules,
    /// `None` until a full build succeeds.
    model: Option<Overlay>,
    /// How many pods claim each IP.
    claims: HashMap<IpAddr, u32>,
    /// How many pods of this node claim each uid.
    uids: HashMap<Arc<str>, u32>,
    /// Service names (of a service or of a slice's service) as small ids.
    ids: HashMap<Key, u32>,
    keys: Vec<Key>,
    /// (VIP, service) of every service in the store, with how many times it lists it.
    vips: BTreeMap<(IpAddr, u32), u32>,
    /// (ready address, service) of every EndpointSlice, with how many slices list it.
    ready: BTreeMap<(IpAddr, u32), u32>,
    /// Each service's EndpointSlices.
    slices_of: HashMap<u32, BTreeSet<Key>>,
    /// Every node's addresses (a node change rebuilds in full).
    node_ips: HashMap<IpAddr, bool>,
    /// The slot of each service in the model.
    service_slot: HashMap<u32, u32>,
    /// This node's pods with no IP yet, in the model.
    pending: BTreeMap<Key, Arc<Workload>>,
    /// Why each skipped object is skipped.
    skips: HashMap<Of, Vec<String>>,
    /// The model's patch limit (see [`Overlay::with_limit`]).
    patch_limit: usize,
    /// Full builds so far.
    full_builds: u64,
}

impl Engine {
    pub fn new(trust_domain: &str, node: &str, rules: Rules) -> Engine {
        Engine {
            trust_domain: trust_domain.to_owned(),
            node: node.to_owned(),
            rules,
            model: None,
            claims: HashMap::new(),
            uids: HashMap::new(),
            ids: HashMap::new(),
            keys: Vec::new(),
            vips: BTreeMap::new(),
            ready: BTreeMap::new(),
            slices_of: HashMap::new(),
            node_ips: HashMap::new(),
            service_slot: HashMap::new(),
            pending: BTreeMap::new(),
            skips: HashMap::new(),
            patch_limit: crate::discovery::overlay::PATCH_LIMIT,
            full_builds: 0,
        }
    }

    /// The engine with its model's patch folded past `limit` entries.
    pub fn with_patch_limit(mut self, limit: usize) -> Engine {
        self.patch_limit = limit;
        self
    }

    /// How many full builds it has made.
    pub fn full_builds(&self) -> u64 {
        self.full_builds
    }

    /// The state after `changes` were made to `store`, and the reasons for skipping objects
    /// that were not reasons before.
    pub fn update(
        &mut self,
        store: &Store,
        changes: Changes,
    ) -> (Result<State, Error>, Vec<String>) {
        if !changes.full && self.model.is_some() {
            let mut fresh = Vec::new();
            if self.apply(store, changes, &mut fresh).is_ok() {
                let model = self.model.as_mut().expect("checked");
                return (Ok(model.snapshot()), fresh);
            }
        }
        self.rebuild(store)
    }

    /// Every reason an object is skipped for now.
    pub fn skipped(&self) -> Vec<String> {
        let mut v: Vec<String> = self.skips.values().flatten().cloned().collect();
        v.sort();
        v
    }

    fn id(&mut self, key: (&str, &str)) -> u32 {
        let key = (key.0.to_owned(), key.1.to_owned());
        if let Some(i) = self.ids.get(&key) {
            return *i;
        }
        let i = self.keys.len() as u32;
        self.ids.insert(key.clone(), i);
        self.keys.push(key);
        i
    }

    /// Sets the reasons `of` is skipped; adds those it was not skipped for to `fresh`.
    fn skip(&mut self, of: Of, why: Vec<String>, fresh: &mut Vec<String>) {
        let old = self.skips.remove(&of).unwrap_or_default();
        fresh.extend(why.iter().filter(|w| !old.contains(w)).cloned());
        if !why.is_empty() {
            self.skips.insert(of, why);
        }
    }

    /// A full build, and the indexes rebuilt from the store.
    fn rebuild(&mut self, store: &Store) -> (Result<State, Error>, Vec<String>) {
        self.full_builds += 1;
        let (state, skipped) = translate::build_keyed(&self.trust_domain, self.rules, store);
        let before: BTreeSet<String> = self.skips.values().flatten().cloned().collect();
        let fresh = skipped
            .iter()
            .filter(|(_, w)| !before.contains(w))
            .map(|(_, w)| w.clone())
            .collect();
        self.skips.clear();
        for (of, why) in skipped {
            self.skips.entry(of).or_default().push(why);
        }
        self.model = None;
        let state = match state {
            Ok(s) => s,
            Err(e) => return (Err(e), fresh),
        };
        let pods = store.pods.values().chain(store.remote_pods.values());
        self.claims.clear();
        for p in pods {
            for ip in p.ips.iter() {
                *self.claims.entry(*ip).or_default() += 1;
            }
        }
        self.uids.clear();
        for p in store.pods.values().filter(|p| !p.uid.is_empty()) {
            *self.uids.entry(p.uid.clone()).or_default() += 1;
        }
        self.vips.clear();
        self.service_slot.clear();
        for (k, s) in &store.services {
            let id = self.id((&k.0, &k.1));
            for v in &s.vips {
                *self.vips.entry((*v, id)).or_default() += 1;
            }
            let slot = s.vips.first().and_then(|v| state.slot_of_vip(*v));
            if let Some(slot) = slot.filter(|i| {
                let svc = state.service_at(*i);
                svc.is_some_and(|x| Arc::ptr_eq(&x.name, &s.name))
            }) {
                self.service_slot.insert(id, slot);
            }
        }
        self.node_ips = translate::node_ips(store);
        self.ready.clear();
        self.slices_of.clear();
        for (k, s) in &store.slices {
            let id = self.id((&k.0, &s.service));
            self.slices_of.entry(id).or_default().insert(k.clone());
            for ip in &s.ready {
                *self.ready.entry((*ip, id)).or_default() += 1;
            }
        }
        self.pending = state
            .pending()
            .iter()
            .map(|w| ((w.namespace.to_string(), w.name.to_string()), w.clone()))
            .collect();
        let mut model = Overlay::new(state).with_limit(self.patch_limit);
        let state = model.snapshot();
        self.model = Some(model);
        (Ok(state), fresh)
    }

    /// Applies `changes` to the model; `Err` when they need a full build (the model is then
    /// left half changed, to be rebuilt).
    fn apply(
        &mut self,
        store: &Store,
        changes: Changes,
        fresh: &mut Vec<String>,
    ) -> Result<(), Full> {
        let mut ips = Vec::new();
        let mut uids = Vec::new();
        let mut services = BTreeSet::new();
        let mut pending_changed = false;
        for ((local, key), old) in &changes.pods {
            let new = match local {
                true => store.pods.get(key),
                false => store.remote_pods.get(key),
            };
            if old.as_ref() == new {
                continue;
            }
            let p = PodChange {
                local: *local,
                key,
                old: old.as_ref(),
                new,
            };
            pending_changed |= self.pod_changed(store, p, &mut ips, &mut uids, fresh)?;
        }
        ips.sort_unstable();
        ips.dedup();
        for ip in &ips {
            let on = (*ip, 0)..=(*ip, u32::MAX);
            services.extend(self.ready.range(on.clone()).map(|((_, id), _)| *id));
            services.extend(self.vips.range(on).map(|((_, id), _)| *id));
        }
        for (key, old) in changes.slices {
            let new = store.slices.get(&key);
            if let Some(old) = &old {
                let id = self.id((&key.0, &old.service));
                if let Some(s) = self.slices_of.get_mut(&id) {
                    s.remove(&key);
                }
                for ip in &old.ready {
                    uncount(&mut self.ready, (*ip, id));
                }
                services.insert(id);
            }
            if let Some(new) = new {
                let id = self.id((&key.0, &new.service));
                self.slices_of.entry(id).or_default().insert(key.clone());
                for ip in &new.ready {
                    *self.ready.entry((*ip, id)).or_default() += 1;
                }
                services.insert(id);
            }
        }
        for (key, old) in changes.services {
            let id = self.id((&key.0, &key.1));
            services.insert(id);
            let new = store.services.get(&key);
            for v in old.iter().flat_map(|o| &o.vips) {
                uncount(&mut self.vips, (*v, id));
                services.extend(
                    self.vips
                        .range((*v, 0)..=(*v, u32::MAX))
                        .map(|((_, i), _)| *i),
                );
            }
            for v in new.iter().flat_map(|o| &o.vips) {
                *self.vips.entry((*v, id)).or_default() += 1;
                services.extend(
                    self.vips
                        .range((*v, 0)..=(*v, u32::MAX))
                        .map(|((_, i), _)| *i),
                );
            }
        }
        for id in services {
            self.service_changed(store, id, &mut uids, fresh);
        }
        uids.sort_unstable();
        uids.dedup();
        for uid in uids {
            self.refresh_services_of(&uid);
        }
        if pending_changed {
            let pending = self.pending.values().cloned().collect();
            self.model.as_mut().expect("checked").set_pending(pending);
        }
        Ok(())
    }

    /// Applies one pod's change; adds the IPs whose workload changed to `ips` and the uids
    /// whose services may have to `uids`. Whether the pending pods changed.
    fn pod_changed(
        &mut self,
        store: &Store,
        p: PodChange<'_>,
        ips: &mut Vec<IpAddr>,
        uids: &mut Vec<Arc<str>>,
        fresh: &mut Vec<String>,
    ) -> Result<bool, Full> {
        let (old, new) = (p.old, p.new);
        let old_ips = old.map_or(&[][..], |o| &o.ips);
        let new_ips = new.map_or(&[][..], |n| &n.ips);
        let contested = |c: &HashMap<IpAddr, u32>| {
            old_ips
                .iter()
                .chain(new_ips)
                .any(|ip| c.get(ip).is_some_and(|n| *n > 1))
        };
        if contested(&self.claims) {
            return Err(Full);
        }
        for ip in old_ips {
            let n = self.claims.get_mut(ip).expect("claimed");
            *n -= 1;
            if *n == 0 {
                self.claims.remove(ip);
            }
        }
        for ip in new_ips {
            *self.claims.entry(*ip).or_default() += 1;
        }
        if contested(&self.claims) {
            return Err(Full);
        }
        if p.local {
            let uid = |e: Option<&PodEntry>| e.map(|e| e.uid.clone()).filter(|u| !u.is_empty());
            if let Some(u) = uid(old) {
                let n = self.uids.get_mut(&u).expect("claimed");
                if *n > 1 {
                    // The other pod of that uid was skipped for it: it may be one now.
                    return Err(Full);
                }
                *n -= 1;
                if *n == 0 {
                    self.uids.remove(&u);
                }
                uids.push(u);
            }
            if let Some(u) = uid(new) {
                *self.uids.entry(u.clone()).or_default() += 1;
                if self.uids[&u] > 1 {
                    return Err(Full);
                }
                uids.push(u);
            }
        }
        let outcome = new.map(|n| {
            let ns = store
                .namespaces
                .get(&(String::new(), n.namespace.to_string()))
                .map(|e| &e.labels);
            let node = store
                .nodes
                .get(&(String::new(), n.node.to_string()))
                .map(|e| &e.locality);
            let claims = &self.claims;
            translate::pod_outcome(&self.trust_domain, self.rules, n, ns, node, |ip| {
                claims.get(ip).is_some_and(|c| *c > 1)
            })
        });
        let model = self.model.as_mut().expect("checked");
        let slot = old.and_then(|o| {
            let s = model.state().slot_of_ip(*o.ips.first()?)?;
            let w = model.state().workload_at(s)?;
            // By value: the store's entry is rebuilt on every event, also when nothing the
            // model keeps changed (the change is then skipped, and the model keeps the
            // workload made from the entry before).
            (w.name == o.name && w.namespace == o.namespace).then_some(s)
        });
        let mut pending_changed = false;
        if let Some(o) = old {
            if let Some(s) = slot {
                for ip in o.ips.iter() {
                    model.unset_ip(*ip, s);
                }
            }
            if p.local && self.pending.remove(p.key).is_some() {
                pending_changed = true;
            }
            if !o.uid.is_empty() && (slot.is_some() || pending_changed) {
                model.set_uid(o.uid.clone(), None);
            }
        }
        let mut why = Vec::new();
        let same = |w: &Workload| {
            old.is_some_and(|o| *o.ips == *new_ips && o.uid == w.uid) && slot.is_some()
        };
        match outcome {
            Some(PodOutcome::Workload(w)) => {
                if !same(&w) {
                    ips.extend(old_ips.iter().chain(new_ips));
                }
                let s = slot.unwrap_or_else(|| model.new_workload_slot());
                let w = Arc::new(w);
                for ip in w.ips.iter() {
                    model.set_ip(*ip, Some(s));
                }
                if !w.uid.is_empty() {
                    model.set_uid(w.uid.clone(), Some(w.clone()));
                }
                model.set_workload(s, Some(w));
            }
            other => {
                if let Some(s) = slot {
                    model.set_workload(s, None);
                    ips.extend(old_ips);
                }
                match other {
                    Some(PodOutcome::Pending(w)) if !w.uid.is_empty() => {
                        let w = Arc::new(w);
                        model.set_uid(w.uid.clone(), Some(w.clone()));
                        self.pending.insert(p.key.clone(), w);
                        pending_changed = true;
                    }
                    Some(PodOutcome::Skipped(w)) => why.push(w),
                    _ => {}
                }
            }
        }
        self.skip(Of::Pod(p.local, p.key.clone()), why, fresh);
        Ok(pending_changed)
    }

    /// Translates service `id` again, with its endpoints; adds the uids of its old and new
    /// endpoints to `uids`.
    fn service_changed(
        &mut self,
        store: &Store,
        id: u32,
        uids: &mut Vec<Arc<str>>,
        fresh: &mut Vec<String>,
    ) {
        let key = self.keys[id as usize].clone();
        let slices: Vec<&SliceEntry> = self
            .slices_of
            .get(&id)
            .into_iter()
            .flatten()
            .filter_map(|k| store.slices.get(k))
            .collect();
        let model = self.model.as_mut().expect("checked");
        let (svc, why) = match store.services.get(&key) {
            Some(e) => translate::service_outcome(
                e,
                store
                    .namespaces
                    .get(&(String::new(), e.namespace.to_string())),
                &slices,
                |v| {
                    self.vips
                        .range((*v, 0)..=(*v, u32::MAX))
                        .map(|(_, n)| n)
                        .sum::<u32>()
                        > 1
                },
                |v| model.state().slot_of_ip(*v).is_some(),
                |v| self.node_ips.get(v).copied(),
            ),
            None => (None, Vec::new()),
        };
        let old = self.service_slot.get(&id).copied();
        if let Some(s) = old {
            let endpoints = model.state().endpoints_at(s);
            let of = endpoints
                .iter()
                .filter_map(|&j| model.state().workload_at(j));
            uids.extend(of.filter(|w| !w.uid.is_empty()).map(|w| w.uid.clone()));
        }
        match svc {
            Some(svc) => {
                let s = old.unwrap_or_else(|| model.new_service_slot());
                let state = model.state();
                let mut eps: Vec<u32> = translate::ready(&slices)
                    .filter_map(|(ip, pod)| {
                        let j = state.slot_of_ip(*ip)?;
                        let w = state.workload_at(j)?;
                        translate::is_endpoint(w, pod).then_some(j)
                    })
                    .collect();
                // In the order of a full build: this node's workloads first, then by key.
                let order = |&j: &u32| {
                    let w = state.workload_at(j).expect("indexed");
                    (*w.node != *self.node, w.namespace.clone(), w.name.clone())
                };
                eps.sort_unstable_by_key(order);
                eps.dedup();
                let of = eps.iter().filter_map(|&j| state.workload_at(j));
                uids.extend(of.filter(|w| !w.uid.is_empty()).map(|w| w.uid.clone()));
                model.set_service(s, Some(Arc::new(svc)));
                model.set_endpoints(s, eps.into());
                self.service_slot.insert(id, s);
            }
            None => {
                if let Some(s) = old {
                    model.set_service(s, None);
                    self.service_slot.remove(&id);
                }
            }
        }
        self.skip(Of::Service(key), why, fresh);
    }

    /// Sets the services of the workload with `uid` (this node's) from the endpoints of the
    /// services whose slices list its IPs, in the order of a full build (by name).
    fn refresh_services_of(&mut self, uid: &Arc<str>) {
        let model = self.model.as_mut().expect("checked");
        let state = model.state();
        let mut of: Vec<usize> = Vec::new();
        if let Some(w) = state.workload_by_uid(uid) {
            let slot = w.ips.first().and_then(|ip| state.slot_of_ip(*ip));
            if let Some(slot) =
                slot.filter(|s| state.workload_at(*s).is_some_and(|x| Arc::ptr_eq(x, w)))
            {
                for ip in w.ips.iter() {
                    for ((_, id), _) in self.ready.range((*ip, 0)..=(*ip, u32::MAX)) {
                        let Some(&s) = self.service_slot.get(id) else {
                            continue;
                        };
                        if state.endpoints_at(s).contains(&slot) {
                            of.push(s as usize);
                        }
                    }
                }
            }
        }
        of.sort_unstable_by_key(|&s| {
            let svc = state.service_at(s as u32).expect("indexed");
            (svc.namespace.clone(), svc.name.clone())
        });
        of.dedup();
        if of != model.services_of_uid(uid) {
            model.set_services_of_uid(uid.clone(), of);
        }
    }
}

/// Takes one from the count at `k`, and the entry when none is left.
fn uncount(m: &mut BTreeMap<(IpAddr, u32), u32>, k: (IpAddr, u32)) {
    if let Some(n) = m.get_mut(&k) {
        *n -= 1;
        if *n == 0 {
            m.remove(&k);
        }
    }
}

/// One pod's change: its entry before and after.
struct PodChange<'a> {
    local: bool,
    key: &'a Key,
    old: Option<&'a PodEntry>,
    new: Option<&'a PodEntry>,
}

#[cfg(test)]
#[path = "incremental_tests.rs"]
mod tests;
