use super::*;

#[test]
fn plurals() {
    for (kind, want) in [
        ("Pod", "pods"),
        ("Endpoints", "endpoints"),
        ("EndpointSlice", "endpointslices"),
        ("AuthorizationPolicy", "authorizationpolicies"),
        ("PeerAuthentication", "peerauthentications"),
        ("TokenReview", "tokenreviews"),
        ("Ingress", "ingresses"),
        ("Gateway", "gateways"),
    ] {
        assert_eq!(plural(kind), want, "{kind}");
    }
}

#[test]
fn paths() {
    assert_eq!(
        collection_path("v1", "Pod", Some("ns1")),
        "/api/v1/namespaces/ns1/pods"
    );
    assert_eq!(
        collection_path("v1", "Namespace", Some("x")),
        "/api/v1/namespaces"
    );
    assert_eq!(
        collection_path("discovery.k8s.io/v1", "EndpointSlice", None),
        "/apis/discovery.k8s.io/v1/endpointslices"
    );
    let t = parse_path("/api/v1/namespaces/a/pods/p").unwrap();
    assert_eq!(
        (
            t.api_version.as_str(),
            t.plural.as_str(),
            t.namespace.as_deref(),
            t.name.as_deref()
        ),
        ("v1", "pods", Some("a"), Some("p"))
    );
    let t = parse_path("/api/v1/namespaces/a").unwrap();
    assert_eq!(
        (t.plural.as_str(), t.name.as_deref()),
        ("namespaces", Some("a"))
    );
    let t = parse_path("/apis/security.ztunnel.dev/v1/authorizationpolicies").unwrap();
    assert_eq!(t.api_version, "security.ztunnel.dev/v1");
}

#[test]
fn selectors() {
    let pod =
        json!({"metadata": {"namespace": "a", "labels": {"app": "x"}}, "spec": {"nodeName": "n1"}});
    let sel = |f: &str, l: &str| Selector::parse(None, f, l).unwrap().matches(&pod);
    assert!(sel("spec.nodeName=n1", ""));
    assert!(!sel("spec.nodeName=n2", ""));
    assert!(sel("spec.nodeName!=n2,metadata.namespace=a", "app=x"));
    assert!(!sel("", "app!=x"));
    assert!(sel("", "app,!other"));
    assert!(!sel("", "other"));
    let q = query_map(Some("fieldSelector=spec.nodeName%3Dn1&watch=true"));
    assert_eq!(q["fieldSelector"], "spec.nodeName=n1");
}

async fn client(api: &ApiServer) -> kube::Client {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    api.write_kubeconfig(&path, "t0ken");
    let kc = kube::config::Kubeconfig::read_from(&path).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    kube::Client::try_from(cfg).unwrap()
}

fn pod(ns: &str, name: &str, node: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
           "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]}})
}

#[tokio::test]
async fn a_kube_client_lists_watches_and_sees_410() {
    use futures::{StreamExt, TryStreamExt};
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, ListParams, PatchParams, WatchEvent, WatchParams};

    let api = ApiServer::start();
    api.apply(pod("a", "p1", "n1"));
    api.apply(pod("b", "p2", "n2"));
    let c = client(&api).await;
    let pods: Api<Pod> = Api::all(c.clone());
    let list = pods.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 2);
    let rv = list.metadata.resource_version.clone().unwrap();
    let on_n1 = pods
        .list(&ListParams::default().fields("spec.nodeName=n1"))
        .await
        .unwrap();
    assert_eq!(on_n1.items.len(), 1);
    let page = pods.list(&ListParams::default().limit(1)).await.unwrap();
    assert_eq!(page.items.len(), 1);
    let token = page.metadata.continue_.clone().expect("a continue token");
    let rest = pods
        .list(&ListParams::default().limit(1).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(rest.items.len(), 1);
    assert_ne!(rest.items[0].metadata.name, page.items[0].metadata.name);
    assert!(rest.metadata.continue_.is_none());
    let in_a: Api<Pod> = Api::namespaced(c.clone(), "a");
    assert_eq!(
        in_a.get("p1").await.unwrap().metadata.name.as_deref(),
        Some("p1")
    );
    let e = in_a.get("nope").await.unwrap_err();
    assert!(
        matches!(e, kube::Error::Api(ref s) if s.code == 404),
        "{e:?}"
    );

    // A watch from the listed version sees later changes, in order, then bookmarks.
    let mut w = pods
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    api.apply(pod("a", "p3", "n1"));
    in_a.patch(
        "p1",
        &PatchParams::default(),
        &kube::api::Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
    )
    .await
    .unwrap();
    api.delete("v1", "Pod", Some("b"), "p2");
    api.bookmark();
    let mut seen = vec![];
    for _ in 0..4 {
        match w.try_next().await.unwrap().unwrap() {
            WatchEvent::Added(p) => seen.push(format!("add {}", p.metadata.name.unwrap())),
            WatchEvent::Modified(p) => seen.push(format!("mod {}", p.metadata.name.unwrap())),
            WatchEvent::Deleted(p) => seen.push(format!("del {}", p.metadata.name.unwrap())),
            WatchEvent::Bookmark(b) => {
                seen.push(format!("bookmark {}", b.metadata.resource_version))
            }
            WatchEvent::Error(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(
        seen,
        [
            "add p3",
            "mod p1",
            "del p2",
            &format!("bookmark {}", api.resource_version())
        ]
    );
    api.close_watches();
    assert!(
        w.try_next().await.unwrap().is_none(),
        "closed by the server"
    );

    // Replay from the old version, then expiry.
    let replay: Vec<_> = {
        let mut w = pods
            .watch(&WatchParams::default(), &rv)
            .await
            .unwrap()
            .boxed();
        let mut v = vec![];
        for _ in 0..3 {
            v.push(w.try_next().await.unwrap().unwrap());
        }
        v
    };
    assert!(matches!(replay[2], WatchEvent::Deleted(_)));
    api.expire_history();
    let mut w = pods
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    match w.try_next().await.unwrap().unwrap() {
        WatchEvent::Error(e) => assert_eq!(e.code, 410),
        other => panic!("{other:?}"),
    }
    assert!(w.try_next().await.unwrap().is_none());
    assert!(api
        .requests()
        .iter()
        .any(|r| r.starts_with("GET /api/v1/pods?") && r.contains("watch=true")));
}

#[tokio::test]
async fn the_runtime_watcher_relists_after_410() {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::Pod;
    use kube::runtime::{watcher, WatchStreamExt};

    let api = ApiServer::start();
    api.apply(pod("a", "p1", "n1"));
    let c = client(&api).await;
    let pods: kube::Api<Pod> = kube::Api::all(c);
    let mut s = watcher(pods, watcher::Config::default())
        .default_backoff()
        .boxed();
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(ev) = s.next().await {
            if let Ok(ev) = ev {
                if tx.send(ev).is_err() {
                    return;
                }
            }
        }
    });
    macro_rules! next {
        () => {
            tokio::time::timeout(Duration::from_secs(20), rx.recv())
                .await
                .unwrap()
                .unwrap()
        };
    }
    assert!(matches!(next!(), watcher::Event::Init));
    assert!(matches!(next!(), watcher::Event::InitApply(_)));
    assert!(matches!(next!(), watcher::Event::InitDone));
    while api.open_watches() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    api.refuse_watches(true);
    api.close_watches();
    api.apply(pod("a", "p2", "n1"));
    api.expire_history();
    api.refuse_watches(false);
    // Resumed from its version: 410, then a fresh list.
    assert!(matches!(next!(), watcher::Event::Init));
    let mut names = vec![];
    loop {
        match next!() {
            watcher::Event::InitApply(p) => names.push(p.metadata.name.unwrap()),
            watcher::Event::InitDone => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(names, ["p1", "p2"]);
    let reqs = api.requests();
    assert!(
        reqs.iter().filter(|r| !r.contains("watch=")).count() >= 2,
        "{reqs:?}"
    );
}

#[tokio::test]
async fn create_conflicts_and_custom_handlers() {
    use k8s_openapi::api::core::v1::ConfigMap;
    let api = ApiServer::start();
    api.on_create("/apis/authentication.k8s.io/v1/tokenreviews", |mut body| {
        body["status"] =
            json!({"authenticated": true, "user": {"username": "system:serviceaccount:x:y"}});
        (201, body)
    });
    let c = client(&api).await;
    let cms: kube::Api<ConfigMap> = kube::Api::namespaced(c.clone(), "ns");
    let mut cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "c"}, "data": {"k": "v"}})).unwrap();
    let created = cms.create(&Default::default(), &cm).await.unwrap();
    let e = cms.create(&Default::default(), &cm).await.unwrap_err();
    assert!(
        matches!(e, kube::Error::Api(ref s) if s.code == 409),
        "{e:?}"
    );
    cm.metadata.resource_version = Some("1".into());
    let e = cms
        .replace("c", &Default::default(), &cm)
        .await
        .unwrap_err();
    assert!(
        matches!(e, kube::Error::Api(ref s) if s.code == 409),
        "{e:?}"
    );
    cm.metadata.resource_version = created.metadata.resource_version;
    cms.replace("c", &Default::default(), &cm).await.unwrap();
    assert_eq!(
        api.get("v1", "ConfigMap", Some("ns"), "c").unwrap()["data"]["k"],
        "v"
    );
    use k8s_openapi::api::authentication::v1::TokenReview;
    let trs: kube::Api<TokenReview> = kube::Api::all(c);
    let tr: TokenReview =
        serde_json::from_value(json!({"spec": {"token": "x", "audiences": ["a"]}})).unwrap();
    let out = trs.create(&Default::default(), &tr).await.unwrap();
    assert_eq!(out.status.unwrap().authenticated, Some(true));
}
