//! A transfer that spans certificate renewals is not interrupted: the daemons run with a 4 s
//! certificate lifetime (renewal every ~2 s) while a connection moves data for ~7 s.

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
    let mesh = Mesh::start(short(), short()).expect("test bed");
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
