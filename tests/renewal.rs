//! A transfer that spans certificate renewals is not interrupted: the daemons run with a 4 s
//! certificate lifetime (renewal every ~2 s) while a connection moves data for ~7 s. A CA root
//! rotation in two phases, followed by renewals alone, refuses no connection.

use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ztunnel_e2e::apps;
use ztunnel_e2e::mesh::{Mesh, NodeOptions, B_IP};

fn serials(mesh_ns: &ztunnel_e2e::netns::Netns) -> Vec<String> {
    Mesh::config_dump(mesh_ns)["certificates"]
        .as_array()
        .expect("certificates")
        .iter()
        .map(|c| c["serial"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn transfer_spanning_a_certificate_renewal_is_not_interrupted() {
    let short = || NodeOptions {
        extra_args: vec!["--cert-lifetime".into(), "4s".into()],
        ..Default::default()
    };
    let mesh = Mesh::builder().a(short()).b(short()).start();
    let before = serials(&mesh.a);
    assert_eq!(before.len(), 1, "one local workload on node a");
    let server = mesh.b.serve(8080, |l| async move {
        let (mut s, _) = l.accept().await?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        s.write_all(&h.finalize()).await?;
        Ok::<_, std::io::Error>(())
    });
    let (sent, echoed) = mesh
        .a
        .block_on(async {
            let mut s = TcpStream::connect((B_IP, 8080)).await?;
            let mut h = Sha256::new();
            let mut p = apps::Pattern::new(9);
            let mut chunk = vec![0u8; 256 * 1024];
            for _ in 0..28 {
                p.fill(&mut chunk);
                h.update(&chunk);
                s.write_all(&chunk).await?;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            s.shutdown().await?;
            let mut digest = Vec::new();
            s.read_to_end(&mut digest).await?;
            Ok::<_, std::io::Error>((h.finalize().to_vec(), digest))
        })
        .expect("transfer");
    mesh.b.join(server).expect("server");
    assert_eq!(sent, echoed, "bytes arrived intact across renewals");
    let after = serials(&mesh.a);
    assert_ne!(
        before, after,
        "the certificate was renewed during the transfer"
    );
    assert!(mesh.a_daemon.log().contains("certificate renewed"));
}

/// A CA root rotation in two phases, with traffic flowing across both: the daemons ask a
/// `ztunnel ca` on host c whose plugged-in directory is rotated as the README says. Phase 1
/// puts the new root beside the old (the old key still signs); once both daemons have renewed
/// and trust both roots, phase 2 puts the new key in. Certificates live 4 s, so each phase is
/// reached by renewals alone, no restart; a client opening a new connection every 50 ms
/// through it all is never refused.
#[test]
fn a_two_phase_root_rotation_refuses_no_connection() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use ztunnel_e2e::mesh::C_IP;

    let ca_address = format!("{C_IP}:15012");
    let node = || NodeOptions {
        ca_address: Some(ca_address.clone()),
        extra_args: vec!["--cert-lifetime".into(), "4s".into()],
        ..Default::default()
    };
    let mesh = Mesh::builder().a(node()).b(node()).start();
    let tokens = mesh.dir.path().join("ca-tokens");
    std::fs::write(&tokens, "a-token\n").unwrap();
    let args: Vec<String> = [
        "ca",
        "--ca-dir",
        &mesh.ca_dir.display().to_string(),
        "--listen",
        &ca_address,
        "--token-file",
        &tokens.display().to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    let ca = ztunnel_e2e::daemon::Process::start(&mesh.c, "ca", mesh.dir.path(), &args, &[])
        .expect("the CA");
    let dump = |ns: &ztunnel_e2e::netns::Netns| Mesh::config_dump(ns)["certificates"].clone();
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !f() {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}; CA log:\n{}",
                ca.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let roots_everywhere = |n: u64| {
        [&mesh.a, &mesh.b].iter().all(|ns| {
            let certs = dump(ns);
            certs
                .as_array()
                .is_some_and(|c| !c.is_empty() && c.iter().all(|c| c["roots"].as_u64() == Some(n)))
        })
    };
    wait("both daemons hold certificates", &|| roots_everywhere(1));

    // Traffic: a new connection every 50 ms from a to b, each echoing 3 bytes.
    mesh.b.serve(8080, |l| async move {
        loop {
            let _ = apps::echo_one(&l).await;
        }
    });
    let (stop, ok, failed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let traffic = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        mesh.a.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match apps::send_and_read(B_IP, 8080, b"abc").await {
                    Ok(b) if b == b"abc" => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    wait("traffic flows", &|| ok.load(Ordering::Relaxed) >= 5);

    // Phase 1: the new root beside the old; every daemon comes to trust both.
    let old_root = std::fs::read_to_string(mesh.ca_dir.join("root-cert.pem")).unwrap();
    let fresh = ztunnel::ca::CaMaterial::generate("cluster.local").unwrap();
    let bundle = format!("{old_root}{}", fresh.root_cert);
    std::fs::write(mesh.ca_dir.join("root-cert.pem"), &bundle).unwrap();
    wait("both daemons trust both roots", &|| roots_everywhere(2));
    let serials_before = (serials(&mesh.a), serials(&mesh.b));

    // Phase 2: the new key signs; every daemon renews from it.
    std::fs::write(mesh.ca_dir.join("cert-chain.pem"), &fresh.cert_chain).unwrap();
    std::fs::write(mesh.ca_dir.join("ca-key.pem"), &fresh.ca_key).unwrap();
    std::fs::write(mesh.ca_dir.join("ca-cert.pem"), &fresh.ca_cert).unwrap();
    wait("the CA signs with the new key", &|| {
        ca.log()
            .matches("CA material changed; signing with it")
            .count()
            >= 2
    });
    let switched = ok.load(Ordering::Relaxed);
    wait("both daemons renewed from the new key", &|| {
        serials(&mesh.a) != serials_before.0 && serials(&mesh.b) != serials_before.1
    });
    wait("traffic after the switch", &|| {
        ok.load(Ordering::Relaxed) >= switched + 20
    });
    stop.store(true, Ordering::Relaxed);
    mesh.a.join(traffic);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "{} connections carried; a's log:\n{}",
        ok.load(Ordering::Relaxed),
        mesh.a_daemon.log()
    );
}
