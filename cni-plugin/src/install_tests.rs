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
    let text = r#"{"name":"n","cniVersion":"1.0.0","plugins":[
        {"type":"ztunnel-cni","timeout":"9s","extra":1,"socket":"/old"},
        {"type":"portmap"},
        {"type":"ztunnel-cni","socket":"/dup"}]}"#;
    let out = insert(parse(text).unwrap(), &settings()).unwrap();
    let expected = parse(
        r#"{"name":"n","cniVersion":"1.0.0","plugins":[
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

/// The primary is the first file by name that a runtime loads (libcni's extensions, hidden
/// files included); the files before it that a runtime skips are named.
#[test]
fn the_primary_is_the_first_file_a_runtime_loads() {
    let valid = r#"{"name":"k8s","cniVersion":"1.0.0","plugins":[{"type":"bridge"}]}"#;
    let single = r#"{"cniVersion":"1.0.0","name":"one","type":"bridge"}"#;
    // (files, the primary, how many files before it are skipped)
    type Files<'a> = &'a [(&'a str, &'a str)];
    let cases: [(Files<'_>, Option<&str>, usize); 7] = [
        (&[], None, 0),
        (
            &[
                ("README.txt", single),
                ("20-b.conf", single),
                ("10-a.conflist", valid),
            ],
            Some("10-a.conflist"),
            0,
        ),
        (
            &[("05-cilium.json", single), ("10-k8s.conflist", valid)],
            Some("05-cilium.json"),
            0,
        ),
        (
            &[(".00-hidden.conflist", valid), ("10-k8s.conflist", valid)],
            Some(".00-hidden.conflist"),
            0,
        ),
        (
            &[
                ("00-broken.conflist", "{\"plugins\": ["),
                ("10-k8s.conflist", valid),
            ],
            Some("10-k8s.conflist"),
            1,
        ),
        (
            &[
                ("00-a.json", "{}"),
                ("01-b.conflist", r#"{"plugins":[{"type":"x"}]}"#),
                ("10-k8s.conf", single),
            ],
            Some("10-k8s.conf"),
            2,
        ),
        (
            &[(".10-a.conflist.1.tmp", valid), ("10-a.conflist", valid)],
            Some("10-a.conflist"),
            0,
        ),
    ];
    for (files, want, skipped) in cases {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("05-dir.conf")).unwrap();
        for (name, text) in files {
            fs::write(dir.path().join(name), text).unwrap();
        }
        let got = find_primary(dir.path()).unwrap();
        let name = got
            .as_ref()
            .map(|p| p.path.file_name().unwrap().to_str().unwrap().to_owned());
        assert_eq!(name.as_deref(), want, "{files:?}");
        assert_eq!(got.map_or(0, |p| p.skipped.len()), skipped, "{files:?}");
    }
}

/// Bytes that are not UTF-8 are read as a runtime written in Go reads them (U+FFFD): such a
/// file can still be the primary; one of them outside JSON is skipped as malformed.
#[test]
fn bytes_that_are_not_utf8_are_read_as_go_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut latin1 = br#"{"name":"r"#.to_vec();
    latin1.push(0xe9);
    latin1.extend_from_slice(br#"seau","cniVersion":"1.0.0","plugins":[{"type":"bridge"}]}"#);
    fs::write(dir.path().join("05-latin1.conflist"), &latin1).unwrap();
    fs::write(dir.path().join("10-k8s.conflist"), FLANNEL).unwrap();
    let p = find_primary(dir.path()).unwrap().unwrap();
    assert_eq!(p.path, dir.path().join("05-latin1.conflist"));
    fs::write(dir.path().join("00-binary.conflist"), [0xff, 0xfe, 0x00]).unwrap();
    let p = find_primary(dir.path()).unwrap().unwrap();
    assert_eq!(p.path, dir.path().join("05-latin1.conflist"));
    assert_eq!(p.skipped.len(), 1, "{:?}", p.skipped);
    // Not rewritten (its bytes would change), nor the next file chained in its place.
    let err = install_config(dir.path(), &settings()).unwrap_err();
    assert!(err.to_string().contains("not UTF-8"), "{err}");
    assert_eq!(
        fs::read(dir.path().join("05-latin1.conflist")).unwrap(),
        latin1
    );
    assert_eq!(
        fs::read_to_string(dir.path().join("10-k8s.conflist")).unwrap(),
        FLANNEL
    );
}

/// What a runtime refuses to load.
#[test]
fn unloadable_configurations() {
    let cases = [
        (
            "a.conflist",
            r#"{"name":"n","plugins":[{"type":"x"}]}"#,
            None,
        ),
        (
            "a.conflist",
            r#"{"plugins":[{"type":"x"}]}"#,
            Some("without a `name`"),
        ),
        (
            "a.conflist",
            r#"{"name":"n","plugins":[]}"#,
            Some("no plugins"),
        ),
        ("a.conflist", r#"{"name":"n"}"#, None),
        (
            "a.conflist",
            r#"{"name":"n","loadOnlyInlinedPlugins":true}"#,
            Some("no `plugins` list"),
        ),
        (
            "a.conflist",
            r#"{"name":"n","plugins":[{"t":1}]}"#,
            Some("without a `type`"),
        ),
        ("a.conf", r#"{"type":"bridge"}"#, None),
        (
            "a.json",
            r#"{"name":"n","plugins":[{"type":"x"}]}"#,
            Some("without a `type`"),
        ),
        ("a.conf", "[]", Some("not a JSON object")),
    ];
    for (name, text, want) in cases {
        let got = unloadable(Path::new(name), &parse(text).unwrap());
        match want {
            None => assert_eq!(got, None, "{name} {text}"),
            Some(w) => assert!(
                got.as_deref().is_some_and(|g| g.contains(w)),
                "{name} {text}: {got:?}"
            ),
        }
    }
}

/// The plugin is chained only where the runtime would run it at a version it supports: a
/// conflist's `cniVersion`, or the highest of its `cniVersions` and `cniVersion` that libcni
/// knows (versions newer than 1.1.0 are dropped, as libcni drops them); a single plugin
/// converted as a runtime converts it (its name and version, empty when absent).
#[test]
fn chained_only_at_a_supported_version() {
    let cases = [
        (
            r#"{"name":"n","cniVersion":"0.3.1","plugins":[{"type":"x"}]}"#,
            true,
        ),
        (
            r#"{"name":"n","cniVersion":"0.2.0","plugins":[{"type":"x"}]}"#,
            false,
        ),
        (r#"{"name":"n","plugins":[{"type":"x"}]}"#, false),
        (
            r#"{"name":"n","cniVersions":["0.4.0","1.1.0"],"plugins":[{"type":"x"}]}"#,
            true,
        ),
        (
            r#"{"name":"n","cniVersion":"1.0.0","cniVersions":["1.10.0"],"plugins":[{"type":"x"}]}"#,
            true,
        ),
        (
            r#"{"name":"n","cniVersions":["1.0.0","1.1.0","1.2.0"],"plugins":[{"type":"x"}]}"#,
            true,
        ),
        (
            r#"{"name":"n","cniVersion":"1.2.0","cniVersions":["0.2.0"],"plugins":[{"type":"x"}]}"#,
            false,
        ),
        (
            r#"{"name":"n","cniVersion":"1.2.0","cniVersions":["1.3.0"],"plugins":[{"type":"x"}]}"#,
            false,
        ),
        (r#"{"cniVersion":"0.4.0","type":"bridge"}"#, true),
        (r#"{"name":"cbr0","type":"flannel"}"#, false),
    ];
    for (text, chained) in cases {
        let got = insert(parse(text).unwrap(), &settings());
        assert_eq!(got.is_ok(), chained, "{text}: {got:?}");
        if let Err(e) = got {
            assert!(e.contains("does not support"), "{e}");
        }
    }
    let Ok(Inserted::Converted(out)) = insert(parse(cases[8].0).unwrap(), &settings()) else {
        panic!("converted");
    };
    assert_eq!(keys(&out), ["cniVersion", "name", "plugins"]);
    assert_eq!(out["name"], "");
}

/// A conflist reached through a symbolic link is written through it; one whose network has
/// plugin files in a directory of its name (run after the inline ones) is refused, as is a
/// single plugin whose conflist name is taken, the files kept; the written file keeps its mode.
#[test]
fn links_are_kept_and_other_files_never_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real");
    fs::create_dir(&real).unwrap();
    fs::write(real.join("k8s.conflist"), FLANNEL).unwrap();
    fs::set_permissions(real.join("k8s.conflist"), fs::Permissions::from_mode(0o600)).unwrap();
    let conf = dir.path().join("net.d");
    fs::create_dir(&conf).unwrap();
    std::os::unix::fs::symlink(real.join("k8s.conflist"), conf.join("10-k8s.conflist")).unwrap();
    install_config(&conf, &settings()).unwrap();
    assert!(fs::symlink_metadata(conf.join("10-k8s.conflist"))
        .unwrap()
        .is_symlink());
    assert!(contains_ours(
        &read_conf(&real.join("k8s.conflist")).unwrap()
    ));
    assert_eq!(file_mode(&real.join("k8s.conflist")), 0o600);

    // Plugins in a directory named after the network run after the inline ones.
    let frag = tempfile::tempdir().unwrap();
    fs::write(frag.path().join("10-k8s.conflist"), FLANNEL).unwrap();
    fs::create_dir(frag.path().join("cbr0")).unwrap();
    fs::write(
        frag.path().join("cbr0/50-tune.conf"),
        r#"{"type":"tuning"}"#,
    )
    .unwrap();
    let err = install_config(frag.path(), &settings()).unwrap_err();
    assert!(err.to_string().contains("would run after"), "{err}");
    assert_eq!(
        fs::read_to_string(frag.path().join("10-k8s.conflist")).unwrap(),
        FLANNEL
    );
    let inlined = FLANNEL.replacen('{', r#"{"loadOnlyInlinedPlugins":true,"#, 1);
    fs::write(frag.path().join("10-k8s.conflist"), inlined).unwrap();
    install_config(frag.path(), &settings()).unwrap();

    let other = tempfile::tempdir().unwrap();
    fs::write(other.path().join("10-a.conf"), CILIUM).unwrap();
    fs::write(other.path().join("10-a.conflist"), FLANNEL).unwrap();
    let err = install_config(other.path(), &settings()).unwrap_err();
    assert!(err.to_string().contains("would replace"), "{err}");
    assert_eq!(
        fs::read_to_string(other.path().join("10-a.conf")).unwrap(),
        CILIUM
    );
    assert_eq!(
        fs::read_to_string(other.path().join("10-a.conflist")).unwrap(),
        FLANNEL
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

/// Our entry, once, with the installer's settings is the installation; missing, with another
/// value of a setting, or twice, it is not.
#[test]
fn chained_as_the_settings_say() {
    let with = |entries: &[Json]| {
        let mut conf =
            parse(r#"{"name":"n","cniVersion":"1.0.0","plugins":[{"type":"x"}]}"#).unwrap();
        conf["plugins"]
            .as_array_mut()
            .unwrap()
            .extend(entries.iter().cloned());
        chains_as(&conf, &settings())
    };
    let mut other_socket = ours();
    other_socket["socket"] = "/var/run/old/cni.sock".into();
    let mut other_file = ours();
    other_file["enrolledNamespacesFile"] = "/var/run/old/ns.json".into();
    let mut more = ours();
    more["log"] = "debug".into();
    assert!(with(&[ours()]));
    assert!(with(&[more]), "fields of its own kept");
    assert!(!with(&[]));
    assert!(!with(&[other_socket]));
    assert!(!with(&[other_file]));
    assert!(!with(&[ours(), ours()]));
    assert!(!chains_as(&ours(), &settings()), "not a conflist");
}
