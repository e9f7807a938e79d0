//! The installer's pure transformations and file selection.

use super::*;

const CALICO: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
{
  "type": "calico",
  "log_level": "info",
  "datastore_type": "kubernetes",
  "nodename": "node-1",
  "mtu": 1440,
  "ipam": {"type": "calico-ipam", "assign_ipv4": "true"},
  "policy": {"type": "k8s"},
  "kubernetes": {"kubeconfig": "/etc/cni/net.d/calico-kubeconfig"}
},
{"type": "portmap", "snat": true, "capabilities": {"portMappings": true}},
{"type": "bandwidth", "capabilities": {"bandwidth": true}}
  ]
}"#;

const FLANNEL: &str = r#"{
  "name": "cbr0",
  "cniVersion": "0.3.1",
  "plugins": [
{"type": "flannel", "delegate": {"hairpinMode": true, "isDefaultGateway": true}},
{"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}"#;

const CILIUM: &str =
    r#"{"cniVersion":"0.3.1","name":"cilium","type":"cilium-cni","enable-debug":false}"#;

fn settings() -> Settings {
    Settings {
        socket: "/run/z/cni.sock".into(),
        timeout: "3s".into(),
        enrolled_namespaces_file: "/run/z/ns.json".into(),
        exclude_namespaces: vec!["kube-system".into(), "infra".into()],
    }
}

fn ours() -> Json {
    parse(r#"{"type":"ztunnel-cni","socket":"/run/z/cni.sock","timeout":"3s","enrolledNamespacesFile":"/run/z/ns.json","excludeNamespaces":["kube-system","infra"]}"#).unwrap()
}

fn plugins(j: &Json) -> Vec<Json> {
    match j.get("plugins") {
        Some(Json::Array(p)) => p.clone(),
        other => panic!("no plugins: {other:?}"),
    }
}

fn keys(j: &Json) -> Vec<&str> {
    match j {
        Json::Object(f) => f.iter().map(|(k, _)| k.as_str()).collect(),
        _ => panic!("not an object"),
    }
}

#[test]
fn conflists_get_our_entry_appended() {
    for (name, text) in [("calico", CALICO), ("flannel", FLANNEL)] {
        let original = parse(text).unwrap();
        let inserted = insert(original.clone(), &settings()).unwrap();
        let Inserted::Conflist(out) = &inserted else {
            panic!("{name}: converted")
        };
        let mut expected = plugins(&original);
        expected.push(ours());
        assert_eq!(plugins(out), expected, "{name}");
        assert_eq!(keys(out), keys(&original), "{name}");
        assert_eq!(out.get("name"), original.get("name"), "{name}");
        // Rendering keeps the document order of every nested key.
        let rendered = render(out);
        assert!(rendered.ends_with("}\n"), "{name}");
        assert_eq!(parse(&rendered).unwrap(), *out, "{name}");
    }
    let out = insert(parse(CALICO).unwrap(), &settings()).unwrap();
    let calico = &plugins(out.json())[0];
    assert_eq!(
        keys(calico),
        [
            "type",
            "log_level",
            "datastore_type",
            "nodename",
            "mtu",
            "ipam",
            "policy",
            "kubernetes"
        ]
    );
    assert_eq!(keys(calico.get("ipam").unwrap()), ["type", "assign_ipv4"]);
}

#[test]
fn single_plugin_conf_becomes_a_conflist() {
    let out = insert(parse(CILIUM).unwrap(), &settings()).unwrap();
    let Inserted::Converted(out) = out else {
        panic!("not converted")
    };
    let expected = parse(
        r#"{"cniVersion":"0.3.1","name":"cilium","plugins":[
            {"type":"cilium-cni","enable-debug":false},
            {"type":"ztunnel-cni","socket":"/run/z/cni.sock","timeout":"3s","enrolledNamespacesFile":"/run/z/ns.json","excludeNamespaces":["kube-system","infra"]}]}"#,
    )
    .unwrap();
    assert_eq!(out, expected);
    assert_eq!(keys(&out), ["cniVersion", "name", "plugins"]);
    // Converting again is a conflist update that changes nothing.
    let again = insert(out.clone(), &settings()).unwrap();
    assert_eq!(again, Inserted::Conflist(out));
}

#[test]
fn inserting_twice_is_identical() {
    for text in [CALICO, FLANNEL, CILIUM] {
        let once = render(insert(parse(text).unwrap(), &settings()).unwrap().json());
        let twice = render(insert(parse(&once).unwrap(), &settings()).unwrap().json());
        assert_eq!(once, twice);
    }
}

#[test]
fn an_existing_entry_is_updated_in_place() {
    let text = r#"{"name":"n","plugins":[
        {"type":"ztunnel-cni","timeout":"9s","extra":1,"socket":"/old"},
        {"type":"portmap"},
        {"type":"ztunnel-cni","socket":"/dup"}]}"#;
    let out = insert(parse(text).unwrap(), &settings()).unwrap();
    let expected = parse(
        r#"{"name":"n","plugins":[
        {"type":"ztunnel-cni","timeout":"3s","extra":1,"socket":"/run/z/cni.sock","enrolledNamespacesFile":"/run/z/ns.json","excludeNamespaces":["kube-system","infra"]},
        {"type":"portmap"}]}"#,
    )
    .unwrap();
    assert_eq!(out, Inserted::Conflist(expected));
}

#[test]
fn removal_restores_the_original() {
    for text in [CALICO, FLANNEL] {
        let original = parse(text).unwrap();
        let inserted = insert(original.clone(), &settings()).unwrap();
        let removed = remove(inserted.json()).unwrap();
        assert_eq!(removed, original);
        assert_eq!(render(&removed), render(&original));
        assert_eq!(remove(&removed), None);
    }
}

#[test]
fn unusable_configurations_are_errors() {
    for text in ["{\"plugins\": [", "", "{\"type\": \"x\",}", "nul"] {
        assert!(parse(text).is_err(), "{text:?}");
    }
    for (text, reason) in [
        ("[1]", "not a JSON object"),
        (r#"{"plugins":{}}"#, "not an array"),
        (r#"{"name":"x"}"#, "neither"),
        (r#"{"type":3}"#, "not a string"),
    ] {
        let err = insert(parse(text).unwrap(), &settings()).unwrap_err();
        assert!(err.contains(reason), "{text}: {err}");
    }
}

#[test]
fn json_round_trips_scalars_and_order() {
    let text = r#"{"z":1,"a":-2,"m":1.5,"n":null,"b":[true,false,"s\"q"],"e":{}}"#;
    let j = parse(text).unwrap();
    assert_eq!(serde_json::to_string(&j).unwrap(), text);
}

#[test]
fn the_primary_is_the_first_config_file() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(find_primary(dir.path()).unwrap(), None);
    for name in [
        "README.txt",
        "20-b.conf",
        "10-a.conflist",
        ".10-a.conflist.1.tmp",
        "00.json",
    ] {
        fs::write(dir.path().join(name), "{}").unwrap();
    }
    fs::create_dir(dir.path().join("05-dir.conf")).unwrap();
    assert_eq!(
        find_primary(dir.path()).unwrap(),
        Some(dir.path().join("10-a.conflist"))
    );
}

#[test]
fn malformed_primary_is_named_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("10-bad.conflist");
    fs::write(&path, "{\"plugins\": [").unwrap();
    let err = install_config(dir.path(), &settings()).unwrap_err();
    assert!(matches!(err, InstallError::Json { .. }), "{err:?}");
    assert!(err.to_string().contains("10-bad.conflist"), "{err}");
    assert_eq!(fs::read_to_string(&path).unwrap(), "{\"plugins\": [");
}

fn options() -> Options {
    Options {
        cni_conf_dir: "/nonexistent".into(),
        cni_bin_dir: "/nonexistent".into(),
        plugin_binary: None,
        socket: "/s".into(),
        enrolled_namespaces_file: "/e".into(),
        timeout: "5s".into(),
        exclude_namespaces: "kube-system".into(),
    }
}

#[test]
fn a_bad_timeout_option_is_refused() {
    let mut o = options();
    o.timeout = "soon".into();
    assert!(matches!(o.settings(), Err(InstallError::Option(_))));
    o.timeout = "250ms".into();
    assert_eq!(o.settings().unwrap().timeout, "250ms");
}

/// `--exclude-namespaces` is a comma-separated list (blanks ignored, empty for none),
/// written as the plugin's `excludeNamespaces` array, which the plugin reads back.
#[test]
fn excluded_namespaces_are_written_as_the_plugin_reads_them() {
    let mut o = options();
    let cases: &[(&str, &[&str])] = &[
        (
            "kube-system,ztunnel-system",
            &["kube-system", "ztunnel-system"],
        ),
        (" infra , ,istio-system", &["infra", "istio-system"]),
        ("", &[]),
    ];
    for (flag, want) in cases {
        o.exclude_namespaces = flag.to_string();
        let entry = o.settings().unwrap().entry();
        let mut plugin = entry.as_object().unwrap().clone();
        plugin.insert("cniVersion".into(), Json::String("1.0.0".into()));
        let read =
            crate::conf::parse_conf(crate::conf::Command::Del, &Json::Object(plugin).to_string())
                .unwrap();
        assert_eq!(read.exclude_namespaces, *want, "{flag:?}");
    }
}
