//! Signing material from a Kubernetes Secret in the plugged-in CA layout (keys `ca-cert.pem`,
//! `ca-key.pem`, `root-cert.pem`, `cert-chain.pem`), read through the API.
//!
//! - At start ([`load_or_create`]): the Secret is read ([`read`]); if it does not exist, a fresh
//!   self-signed root is created in it (a create, which the API server accepts only while no
//!   Secret of that name exists: another replica creating it first is a `409`, after which
//!   its Secret is read and its material used, so replicas starting together serve one root:
//!   [`create_or_adopt`]).
//!   A Secret that exists, complete or not, is never written: incomplete or invalid, it is an
//!   error.
//! - Then ([`SecretWatch::start`]) the Secret is watched: a valid new content replaces the signer
//!   (rotation: `root-cert.pem` may hold several roots, all served in `roots_pem`; a new
//!   `ca-cert.pem`/`ca-key.pem` signs from then on); an invalid one is refused, logged and
//!   counted, and the old material kept; a deleted Secret keeps the current material.
//! - The trust bundle is published into the ConfigMap `ztunnel-ca-root` (key `root-cert.pem`)
//!   in the Secret's namespace, created or updated (get/create/update) whenever it changes, so
//!   daemons can mount it. Both published ConfigMaps are watched: one changed or deleted by
//!   another hand is written back with what the Secret holds (read again, so that replicas
//!   agree), as istiod keeps its root certificate ConfigMaps.
//! - So are the certificate revocation lists of the Secret's optional key `ca-crl.pem` (as an
//!   Istio plugged-in CA keeps them), into the ConfigMap `ztunnel-ca-crl` under the same key:
//!   empty while the Secret has none, which revokes nothing. Lists that do not parse are
//!   refused, logged and counted like bad material, and the published ones kept; they do not
//!   hold back a valid update of the signing material beside them.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::PostParams;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Api;
use tokio::sync::watch;

use super::local::CaMaterial;
use super::metrics::CaMetrics;
use super::{Error, LocalCa};

/// The ConfigMap the trust bundle is published in.
pub const ROOT_CONFIGMAP: &str = "ztunnel-ca-root";
/// Its key.
pub const ROOT_KEY: &str = "root-cert.pem";

/// The ConfigMap the revocation lists are published in.
pub const CRL_CONFIGMAP: &str = "ztunnel-ca-crl";
/// Its key, and the Secret's.
pub const CRL_KEY: &str = "ca-crl.pem";

/// The revocation lists of a Secret's optional key [`CRL_KEY`] (empty when it has none), if
/// they are UTF-8 and parse.
pub fn crl_of(secret: &Secret) -> Result<String, String> {
    let Some(v) = secret.data.as_ref().and_then(|d| d.get(CRL_KEY)) else {
        return Ok(String::new());
    };
    let text = String::from_utf8(v.0.clone()).map_err(|_| format!("key {CRL_KEY} is not UTF-8"))?;
    crate::identity::crl::Crls::parse(text.as_bytes())
        .map_err(|e| format!("key {CRL_KEY}: {e}"))?;
    Ok(text)
}

/// The material in a Secret's data; every key must be present and UTF-8.
pub fn material_of(secret: &Secret) -> Result<CaMaterial, String> {
    let empty = BTreeMap::new();
    let data = secret.data.as_ref().unwrap_or(&empty);
    let get = |k: &str| -> Result<String, String> {
        let v = data.get(k).ok_or_else(|| format!("key {k} is missing"))?;
        String::from_utf8(v.0.clone()).map_err(|_| format!("key {k} is not UTF-8"))
    };
    let [a, b, c, d] = CaMaterial::NAMES;
    Ok(CaMaterial {
        ca_cert: get(a)?,
        ca_key: get(b)?,
        root_cert: get(c)?,
        cert_chain: get(d)?,
    })
}

/// The Secret holding `m` in the plugged-in CA layout.
pub fn secret_of(name: &str, m: &CaMaterial) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "ztunnel-ca".to_owned(),
            )])),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(
            m.files()
                .iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Default::default()
    }
}

fn kube_err(what: String) -> impl FnOnce(kube::Error) -> Error {
    move |e| Error::Kube(format!("{what}: {e}"))
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Reads the material of Secret `name`, creating it with a fresh root when absent.
pub async fn load_or_create(
    api: &Api<Secret>,
    name: &str,
    trust_domain: &str,
) -> Result<CaMaterial, Error> {
    if let Some(m) = read(api, name).await? {
        return Ok(m);
    }
    create_or_adopt(api, name, CaMaterial::generate(trust_domain)?).await
}

/// The material of Secret `name`, if it exists.
pub async fn read(api: &Api<Secret>, name: &str) -> Result<Option<CaMaterial>, Error> {
    let what = || format!("Secret {name}");
    match api.get_opt(name).await.map_err(kube_err(what()))? {
        Some(s) => material_of(&s)
            .map(Some)
            .map_err(|e| Error::Invalid(format!("{}: {e}", what()))),
        None => Ok(None),
    }
}

/// Creates Secret `name` holding `fresh`, and returns `fresh`; if a Secret of that name exists
/// (`409`: another replica created it first), returns its material instead and drops
/// `fresh`. An existing Secret is never written.
pub async fn create_or_adopt(
    api: &Api<Secret>,
    name: &str,
    fresh: CaMaterial,
) -> Result<CaMaterial, Error> {
    let what = || format!("Secret {name}");
    match api
        .create(&PostParams::default(), &secret_of(name, &fresh))
        .await
    {
        Ok(_) => {
            tracing::info!(
                secret = name,
                "CA: created a new self-signed root in the Secret"
            );
            Ok(fresh)
        }
        Err(e) if is_conflict(&e) => {
            let s = api.get(name).await.map_err(kube_err(what()))?;
            tracing::info!(
                secret = name,
                "CA: another replica created the Secret first; using its root"
            );
            material_of(&s).map_err(|e| Error::Invalid(format!("{}: {e}", what())))
        }
        Err(e) => Err(kube_err(format!("creating {}", what()))(e)),
    }
}

/// Makes ConfigMap [`ROOT_CONFIGMAP`] hold `bundle` under [`ROOT_KEY`].
pub async fn publish_root(api: &Api<ConfigMap>, bundle: &str) -> Result<(), Error> {
    publish(api, ROOT_CONFIGMAP, ROOT_KEY, bundle)
        .await
        .map(drop)
}

/// Makes ConfigMap `name` hold `value` under `key`, creating it if needed; whether it had to
/// be written (it did not hold `value`).
pub async fn publish(
    api: &Api<ConfigMap>,
    name: &str,
    key: &str,
    value: &str,
) -> Result<bool, Error> {
    let what = || format!("ConfigMap {name}");
    for _ in 0..3 {
        match api.get_opt(name).await.map_err(kube_err(what()))? {
            None => {
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(name.into()),
                        ..Default::default()
                    },
                    data: Some(BTreeMap::from([(key.into(), value.into())])),
                    ..Default::default()
                };
                match api.create(&PostParams::default(), &cm).await {
                    Ok(_) => return Ok(true),
                    Err(e) if is_conflict(&e) => continue,
                    Err(e) => return Err(kube_err(format!("creating {}", what()))(e)),
                }
            }
            Some(mut cm) => {
                let data = cm.data.get_or_insert_with(BTreeMap::new);
                if data.get(key).map(String::as_str) == Some(value) {
                    return Ok(false);
                }
                data.insert(key.into(), value.into());
                match api.replace(name, &PostParams::default(), &cm).await {
                    Ok(_) => return Ok(true),
                    Err(e) if is_conflict(&e) => continue,
                    Err(e) => return Err(kube_err(format!("updating {}", what()))(e)),
                }
            }
        }
    }
    Err(Error::Kube(format!("{}: conflicting updates", what())))
}

/// Whether a watch event says the object was changed or deleted (not a list's replay).
fn changed<K>(ev: &Result<Event<K>, watcher::Error>) -> bool {
    matches!(ev, Ok(Event::Apply(_) | Event::Delete(_)))
}

/// What the watcher needs to build a signer.
pub struct SecretWatch {
    pub secrets: Api<Secret>,
    pub configmaps: Api<ConfigMap>,
    pub name: String,
    pub trust_domain: String,
    pub max_lifetime: std::time::Duration,
    pub metrics: Arc<CaMetrics>,
}

impl SecretWatch {
    fn build(&self, m: &CaMaterial) -> Result<LocalCa, Error> {
        Ok(LocalCa::from_material(m, &self.trust_domain)?.with_max_lifetime(self.max_lifetime))
    }

    /// Loads (or creates) the material, publishes its bundle, and starts watching; the
    /// receiver always holds the current signer.
    pub async fn start(
        self,
    ) -> Result<(watch::Receiver<Arc<LocalCa>>, tokio::task::JoinHandle<()>), Error> {
        let material = load_or_create(&self.secrets, &self.name, &self.trust_domain).await?;
        let ca = self.build(&material)?;
        let bundle = ca.root_pem();
        if let Err(e) = publish_root(&self.configmaps, &bundle).await {
            tracing::warn!(error = %e, "CA: cannot publish the trust bundle yet; will retry on the next change");
        }
        let (tx, rx) = watch::channel(Arc::new(ca));
        let task = tokio::spawn(self.watch(material, bundle, tx));
        Ok((rx, task))
    }

    async fn watch(
        self,
        mut current: CaMaterial,
        mut bundle: String,
        tx: watch::Sender<Arc<LocalCa>>,
    ) {
        let named =
            |name: &str| watcher::Config::default().fields(&format!("metadata.name={name}"));
        let secrets = watcher::watcher(self.secrets.clone(), named(&self.name)).default_backoff();
        let roots = watcher::watcher(self.configmaps.clone(), named(ROOT_CONFIGMAP));
        let crls = watcher::watcher(self.configmaps.clone(), named(CRL_CONFIGMAP));
        let (roots, crls) = (roots.default_backoff(), crls.default_backoff());
        futures::pin_mut!(secrets, roots, crls);
        let mut published = false;
        let mut crl: Option<String> = None;
        loop {
            let secret = tokio::select! {
                ev = secrets.next() => match ev {
                    Some(Ok(Event::Apply(s) | Event::InitApply(s))) => s,
                    Some(Ok(Event::Delete(_))) => {
                        tracing::warn!(secret = %self.name, "CA: the Secret was deleted; keeping the current material");
                        continue;
                    }
                    Some(Ok(Event::Init | Event::InitDone)) => continue,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "CA: Secret watch failed; retrying");
                        continue;
                    }
                    None => return,
                },
                // A published ConfigMap changed or deleted by another hand is written back.
                Some(ev) = roots.next() => {
                    if changed(&ev) {
                        self.repair(ROOT_CONFIGMAP, ROOT_KEY).await;
                    }
                    continue;
                }
                Some(ev) = crls.next() => {
                    if changed(&ev) {
                        self.repair(CRL_CONFIGMAP, CRL_KEY).await;
                    }
                    continue;
                }
            };
            match material_of(&secret)
                .map_err(Error::Invalid)
                .and_then(|m| self.build(&m).map(|ca| (m, ca)))
            {
                Ok((m, _)) if m == current => {}
                Ok((m, ca)) => {
                    current = m;
                    bundle = ca.root_pem();
                    published = false;
                    self.metrics.reload(true);
                    tracing::info!(
                        secret = %self.name,
                        roots = ca.root_count(),
                        "CA: new signing material applied"
                    );
                    tx.send_replace(Arc::new(ca));
                }
                Err(e) => {
                    self.metrics.reload(false);
                    tracing::error!(secret = %self.name, error = %e, "CA: refusing an invalid update of the Secret; keeping the current material");
                }
            }
            if !published {
                match publish_root(&self.configmaps, &bundle).await {
                    Ok(()) => published = true,
                    Err(e) => tracing::warn!(error = %e, "CA: cannot publish the trust bundle"),
                }
            }
            self.publish_crl(&secret, &mut crl).await;
        }
    }

    /// Writes ConfigMap `name` back if it no longer holds what the Secret, read now, says
    /// under `key` (the bundle of its roots, or its revocation lists). Read from the Secret,
    /// not from this replica's view of it, so that replicas never write back each other's
    /// older or newer views; nothing is written while the Secret holds what cannot be used.
    async fn repair(&self, name: &str, key: &str) {
        let Ok(Some(secret)) = self.secrets.get_opt(&self.name).await else {
            return;
        };
        let expected = match key {
            ROOT_KEY => material_of(&secret)
                .ok()
                .and_then(|m| self.build(&m).ok())
                .map(|ca| ca.root_pem()),
            _ => crl_of(&secret).ok(),
        };
        let Some(value) = expected else {
            return;
        };
        match publish(&self.configmaps, name, key, &value).await {
            Ok(false) => {}
            Ok(true) => tracing::warn!(
                configmap = name,
                "CA: a published ConfigMap was changed or deleted; written back"
            ),
            Err(e) => {
                tracing::warn!(configmap = name, error = %e, "CA: cannot write back a published ConfigMap")
            }
        }
    }

    /// Publishes the Secret's revocation lists when they changed and parse (`published`: what
    /// was published last).
    async fn publish_crl(&self, secret: &Secret, published: &mut Option<String>) {
        match crl_of(secret) {
            Ok(lists) if published.as_ref() == Some(&lists) => {}
            Ok(lists) => match publish(&self.configmaps, CRL_CONFIGMAP, CRL_KEY, &lists).await {
                Ok(_) => {
                    tracing::info!(
                        configmap = CRL_CONFIGMAP,
                        bytes = lists.len(),
                        "CA: revocation lists published"
                    );
                    *published = Some(lists);
                }
                Err(e) => tracing::warn!(error = %e, "CA: cannot publish the revocation lists"),
            },
            Err(e) => {
                self.metrics.reload(false);
                tracing::error!(secret = %self.name, error = %e, "CA: refusing the Secret's revocation lists; keeping those published");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_round_trip_and_missing_keys() {
        let m = CaMaterial::generate("cluster.local").unwrap();
        let s = secret_of("ca", &m);
        assert_eq!(material_of(&s).unwrap(), m);
        let mut partial = s.clone();
        partial.data.as_mut().unwrap().remove("cert-chain.pem");
        assert!(material_of(&partial)
            .unwrap_err()
            .contains("cert-chain.pem"));
        assert!(material_of(&Secret::default()).is_err());
    }

    #[test]
    fn revocation_lists_are_optional_and_must_parse() {
        let m = CaMaterial::generate("cluster.local").unwrap();
        let mut s = secret_of("ca", &m);
        assert_eq!(crl_of(&s).unwrap(), "", "none: an empty list");
        let ca = LocalCa::from_material(&m, "cluster.local").unwrap();
        let now = std::time::SystemTime::now();
        let lists = ca
            .revocation_list(&["01"], 1, now, std::time::Duration::from_secs(60))
            .unwrap();
        for (value, want) in [
            (lists.as_bytes().to_vec(), Ok(lists.as_str())),
            (b"not a list".to_vec(), Err("without an X509 CRL")),
            (vec![0xff, 0xfe], Err("not UTF-8")),
        ] {
            let data = s.data.get_or_insert_with(BTreeMap::new);
            data.insert(CRL_KEY.into(), ByteString(value));
            match (crl_of(&s), want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want),
                (Err(e), Err(want)) => assert!(e.contains(want), "{e}"),
                (got, want) => panic!("got {got:?}, want {want:?}"),
            }
        }
    }
}
