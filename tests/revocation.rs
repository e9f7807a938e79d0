//! Certificate revocation lists between two real daemons (`--crl-path`), over each transport:
//! lists that come to revoke the peer's certificate close the tunnels already open and refuse
//! new ones, on the dialling side and on the accepting side; lists taken back let tunnels
//! through again; lists that revoke a daemon's own certificate have it renewed at once; a
//! malformed file is refused and the lists in force kept.

use std::path::Path;

use tokio::net::TcpStream;

use super::*;

/// The serial of the certificate the daemon in `ns` holds for `identity`.
fn serial(ns: &ztunnel_e2e::netns::Netns, identity: &str) -> String {
    let dump = Mesh::config_dump(ns);
    dump["certificates"]
        .as_array()
        .expect("the config dump lists certificates")
        .iter()
        .find(|c| c["identity"] == identity)
        .and_then(|c| c["serial"].as_str())
        .unwrap_or_else(|| panic!("no certificate for {identity}: {dump}"))
        .to_owned()
}

/// A connection from `a` to `b`'s port 8080 whose round trip proves the tunnel carries it.
fn open(mesh: &Mesh) -> TcpStream {
    mesh.a
        .block_on(async {
            let mut s = TcpStream::connect((B_IP, 8080)).await?;
            s.write_all(b"ping").await?;
            let mut b = [0u8; 4];
            s.read_exact(&mut b).await?;
            Ok::<_, std::io::Error>(s)
        })
        .expect("a tunnelled round trip")
}

/// Whether the daemon ends `s` (EOF or reset) within 10 s, rather than carrying it.
fn ended(mesh: &Mesh, mut s: TcpStream) -> bool {
    mesh.a.block_on(async move {
        let read = async {
            let mut b = [0u8; 16];
            loop {
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => return,
                    // A late echo: keep reading until the end.
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .is_ok()
    })
}

/// A connection from `a` to `b`'s port 8080 that must not get through.
fn refused(mesh: &Mesh) {
    let outcome = mesh.a.block_on(async {
        let mut s = TcpStream::connect((B_IP, 8080)).await?;
        s.write_all(b"ping").await?;
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await
    });
    assert!(outcome.is_err(), "the connection must not get through");
}

/// Writes `pem` to `path` as a Kubernetes volume update does: a new file renamed over.
fn publish(path: &Path, pem: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, pem).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

for_each_transport! {
    /// `a`'s lists come to revoke `b`'s certificate: the open tunnel is closed
    /// (`certificate_revoked`) and the next is refused at its handshake
    /// (`outbound_peer_revoked`). Taken back, tunnels go through again. Then `b`'s lists
    /// revoke `a`'s client certificate: `b` closes the open tunnel and refuses the next
    /// (`inbound_peer_revoked`); once `a`'s lists revoke it too, `a` renews it at once and
    /// tunnels go through on the new one. A malformed file is counted and changes nothing.
    fn revocation_lists_close_open_tunnels_and_refuse_new_ones(t: Transport) {
        let dir = tempfile::tempdir().unwrap();
        let (crl_a, crl_b) = (dir.path().join("a-crl.pem"), dir.path().join("b-crl.pem"));
        // `a`'s file exists and is empty; `b`'s appears only later.
        std::fs::write(&crl_a, "").unwrap();
        let mut a = t.client();
        a.extra_args
            .extend(["--crl-path".into(), crl_a.display().to_string()]);
        let mut b = t.server();
        b.extra_args
            .extend(["--crl-path".into(), crl_b.display().to_string()]);
        let mesh = Mesh::builder().a(a).b(b).start();
        mesh.b
            .serve(8080, |l| async move { apps::hold_server(l).await });
        let ca = LocalCa::load_or_create(&mesh.ca_dir, "cluster.local").unwrap();
        let list = |serials: &[&str], n: u64| {
            ca.revocation_list(serials, n, std::time::SystemTime::now(), Duration::from_secs(3600))
                .unwrap()
        };

        // a's lists revoke b's certificate.
        let held = open(&mesh);
        let server = serial(&mesh.b, "spiffe://cluster.local/ns/demo/sa/server");
        let client = serial(&mesh.a, "spiffe://cluster.local/ns/demo/sa/client");
        let revoked = [("reason", "certificate_revoked")];
        publish(&crl_a, &list(&[&server], 1));
        assert!(ended(&mesh, held), "a closes the tunnel open to a revoked b");
        let ma = Mesh::metrics_when(&mesh.a, "ztunnel_refusals_total", &revoked, 1.0);
        expect_metric(&ma, "ztunnel_refusals_total", &revoked, 1.0);
        expect_metric(&ma, "ztunnel_crl_lists", &[], 1.0);
        assert_eq!(Mesh::config_dump(&mesh.a)["revocation"]["lists"], 1);
        assert!(
            Mesh::pool(&mesh.a).is_empty(),
            "the revoked connection left the pool: {:?}",
            Mesh::pool(&mesh.a)
        );
        let labels = [("reason", "outbound_peer_revoked")];
        refused(&mesh);
        let ma = Mesh::metrics_when(&mesh.a, "ztunnel_refusals_total", &labels, 1.0);
        expect_metric(&ma, "ztunnel_refusals_total", &labels, 1.0);

        // A malformed file is refused; the lists in force are kept.
        publish(&crl_a, "-----BEGIN X509 CRL-----\nnot base64\n-----END X509 CRL-----\n");
        let ma = Mesh::metrics_when(&mesh.a, "ztunnel_crl_refused_total", &[], 1.0);
        expect_metric(&ma, "ztunnel_crl_refused_total", &[], 1.0);
        refused(&mesh);
        let ma = Mesh::metrics_when(&mesh.a, "ztunnel_refusals_total", &labels, 2.0);
        expect_metric(&ma, "ztunnel_refusals_total", &labels, 2.0);

        // Taken back (a newer list without it): tunnels go through again.
        publish(&crl_a, &list(&[], 2));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let held = loop {
            let got = mesh.a.block_on(async {
                let mut s = TcpStream::connect((B_IP, 8080)).await?;
                s.write_all(b"ping").await?;
                let mut b = [0u8; 4];
                s.read_exact(&mut b).await?;
                Ok::<_, std::io::Error>(s)
            });
            match got {
                Ok(s) => break s,
                Err(e) => assert!(std::time::Instant::now() < deadline, "still refused: {e}"),
            }
            std::thread::sleep(Duration::from_millis(200));
        };

        // b's lists revoke a's client certificate.
        publish(&crl_b, &list(&[&client], 1));
        assert!(ended(&mesh, held), "b closes the tunnel a revoked client opened");
        let mb = Mesh::metrics_when(&mesh.b, "ztunnel_refusals_total", &revoked, 1.0);
        expect_metric(&mb, "ztunnel_refusals_total", &revoked, 1.0);
        let labels = [("reason", "inbound_peer_revoked")];
        refused(&mesh);
        let mb = Mesh::metrics_when(&mesh.b, "ztunnel_refusals_total", &labels, 1.0);
        assert!(
            ztunnel_e2e::daemon::try_metric(&mb, "ztunnel_refusals_total", &labels)
                .is_some_and(|n| n >= 1.0),
            "b refuses the revoked client's new tunnel at its handshake:\n{}",
            mesh.b_daemon.log()
        );
        let log = mesh.b_daemon.log();
        assert!(
            log.contains("a revocation list revokes the peer's certificate"),
            "b logs why:\n{log}"
        );

        // a learns it too: it renews the client's certificate at once, and the new one
        // (which b's lists do not name) gets through.
        publish(&crl_a, &list(&[&client], 3));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let renewed = loop {
            let now = serial(&mesh.a, "spiffe://cluster.local/ns/demo/sa/client");
            if now != client {
                break now;
            }
            assert!(std::time::Instant::now() < deadline, "a did not renew the revoked certificate");
            std::thread::sleep(Duration::from_millis(100));
        };
        let held = open(&mesh);
        drop(held);
        assert!(
            mesh.a_daemon.log().contains("the certificate is revoked by the lists in force; renewing it now"),
            "a logs the renewal of {client} (now {renewed})"
        );
    }
}
