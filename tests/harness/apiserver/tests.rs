use super::*;

#[test]
fn plurals() {
    for (kind, want) in [
        ("Pod", "pods"),
        ("Namespace", "namespaces"),
        ("EndpointSlice", "endpointslices"),
        ("AuthorizationPolicy", "authorizationpolicies"),
        ("PeerAuthentication", "peerauthentications"),
    ] {
        assert_eq!(plural(kind), want, "{kind}");
    }
}

#[test]
fn paths() {
    let t = parse_path("/api/v1/namespaces/a/pods").unwrap();
    assert_eq!(
        (
            t.api_version.as_str(),
            t.plural.as_str(),
            t.namespace.as_deref()
        ),
        ("v1", "pods", Some("a"))
    );
    let t = parse_path("/api/v1/namespaces").unwrap();
    assert_eq!((t.plural.as_str(), t.namespace), ("namespaces", None));
    let t = parse_path("/apis/security.ztunnel.dev/v1/authorizationpolicies").unwrap();
    assert_eq!(t.api_version, "security.ztunnel.dev/v1");
    assert!(
        parse_path("/api/v1/namespaces/a/pods/p").is_none(),
        "objects are not served"
    );
}

#[test]
fn selectors() {
    let pod =
        json!({"metadata": {"namespace": "a", "labels": {"app": "x"}}, "spec": {"nodeName": "n1"}});
    let sel = |f: &str| Selector::parse(None, f).unwrap().matches(&pod);
    assert!(sel("spec.nodeName=n1"));
    assert!(!sel("spec.nodeName=n2"));
    assert!(sel("spec.nodeName!=n2,metadata.namespace=a"));
    assert!(!sel("spec.nodeName!=n1"));
    assert!(!Selector::parse(Some("b".into()), "").unwrap().matches(&pod));
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
    use kube::api::{Api, ListParams, WatchEvent, WatchParams};

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
    // A watch from the listed version sees later changes, in order, then bookmarks.
    let mut w = pods
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    api.apply(pod("a", "p3", "n1"));
    let mut p1 = pod("a", "p1", "n1");
    p1["metadata"]["labels"]["x"] = json!("y");
    api.apply(p1);
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
    api.refuse_watches(Some(503));
    api.close_watches();
    api.apply(pod("a", "p2", "n1"));
    api.expire_history();
    api.refuse_watches(None);
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
