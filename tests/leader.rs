//! A leader that cannot renew its Lease stops all its work before the lease can
//! expire (review A13): kube-lease-manager only reports a loss when it sees another
//! holder, so a leader cut off from the apiserver went on working after a standby
//! could take over. Against the real apiserver, through a TCP proxy the test freezes.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use common::{Fixture, Operator, wait_until};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Frozen: the bytes go nowhere and nothing is closed, like a partition.
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
}

/// A loopback TCP proxy to `upstream` whose traffic stops (no reset) once frozen.
async fn freezable_proxy(upstream: u16) -> (u16, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let frozen = Arc::new(AtomicBool::new(false));
    let f = frozen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pump(cr, sw, f.clone()));
            tokio::spawn(pump(sr, cw, f.clone()));
        }
    });
    (port, frozen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_cannot_renew_stops_before_its_lease_expires() {
    let mut fx = Fixture::new("lease-cut").await;
    fx.operator.kill();
    // The operator's kubeconfig, pointed at the proxy.
    let text = std::fs::read_to_string(&fx.operator_kubeconfig).unwrap();
    let mut kc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let server = kc["clusters"][0]["cluster"]["server"]
        .as_str()
        .unwrap()
        .to_string();
    let upstream: u16 = server.rsplit(':').next().unwrap().parse().unwrap();
    let (port, frozen) = freezable_proxy(upstream).await;
    kc["clusters"][0]["cluster"]["server"] = format!("https://127.0.0.1:{port}").into();
    let proxied = fx.env.dir.join(format!("kubeconfig-proxied-{}", fx.ns));
    std::fs::write(&proxied, serde_yaml::to_string(&kc).unwrap()).unwrap();

    let lease_name = format!("kiln-leader-{}", fx.ns);
    let log = fx
        .env
        .dir
        .join("logs")
        .join(format!("{}-leader.log", fx.ns));
    let mut op = Operator::start_with(
        &proxied,
        &fx.ns,
        &log,
        &[
            "--leader-elect",
            "--leader-election-namespace",
            "kiln-system",
            "--lease-name",
            &lease_name,
            "--lease-duration-seconds",
            "6",
            "--leader-identity",
            "cut-off",
        ],
    );
    wait_until(Duration::from_secs(30), "the replica to lead", || async {
        (op.http_get("/metrics")
            .await
            .ok()
            .map(|(_, b)| common::parse_metric(&b, "kiln_leader"))
            == Some(1.0))
        .then_some(())
    })
    .await;
    // Let it renew at least once, then cut it off from the apiserver.
    tokio::time::sleep(Duration::from_secs(5)).await;
    frozen.store(true, Ordering::SeqCst);
    let cut = Instant::now();
    let leases: Api<Lease> = Api::namespaced(fx.client.clone(), "kiln-system");
    let lease = leases.get(&lease_name).await.unwrap();
    let spec = lease.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("cut-off"));
    let renewed = SystemTime::from(spec.renew_time.or(spec.acquire_time).unwrap().0);
    let expires = renewed + Duration::from_secs(6);

    let exited = wait_until(
        Duration::from_secs(20),
        "the cut-off leader to exit",
        || {
            let running = op.is_running();
            async move { (!running).then(SystemTime::now) }
        },
    )
    .await;
    println!(
        "FIGURES: the cut-off leader exited {:.1}s after the cut, {:.1}s before its lease expired",
        cut.elapsed().as_secs_f64(),
        expires
            .duration_since(exited)
            .map_or(-1.0, |d| d.as_secs_f64())
    );
    // The last renewal the test read may be followed by one more before the cut: the
    // replica must be gone before the lease it last renewed could expire.
    let latest = leases.get(&lease_name).await.unwrap().spec.unwrap();
    let renewed = SystemTime::from(latest.renew_time.or(latest.acquire_time).unwrap().0);
    let expires = (renewed + Duration::from_secs(6)).max(expires);
    assert!(
        exited < expires,
        "the leader ran past the expiry of its lease\n{}",
        common::tail(&op.logs(), 30)
    );
    assert!(
        op.logs().contains("not renewed in time"),
        "{}",
        common::tail(&op.logs(), 30)
    );
}
