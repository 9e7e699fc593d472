//! Many null builds at once: no build holds a controller worker while it runs.

mod common;

use std::time::{Duration, Instant};

use common::{Fixture, tail};
use kiln::api::BuildPhase;
use kube::ResourceExt;
use serde_json::json;

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_builds_at_once_all_succeed() {
    let f = Fixture::new("fifty").await;
    let dir = f.host_dir.display().to_string();
    let n = 50;
    let t = Instant::now();
    let pid = f.operator.pid();
    let creates = (0..n).map(|i| {
        let b = f.null_build(
            &format!("b{i}"),
            json!([{"shell": {"inline": [format!("echo $KILN_BUILD_NAME > {dir}/b{i}")]}}]),
        );
        let f = &f;
        async move { f.create(&b).await.unwrap() }
    });
    futures::future::join_all(creates).await;
    let api = f.api();
    loop {
        let list = api.list(&Default::default()).await.unwrap();
        let done = list
            .items
            .iter()
            .filter(|b| b.status.as_ref().and_then(|s| s.phase) == Some(BuildPhase::Succeeded))
            .count();
        let failed: Vec<_> = list
            .items
            .iter()
            .filter(|b| b.status.as_ref().and_then(|s| s.phase) == Some(BuildPhase::Failed))
            .map(|b| {
                (
                    b.name_any(),
                    b.status.as_ref().and_then(|s| s.message.clone()),
                )
            })
            .collect();
        assert!(failed.is_empty(), "failed builds: {failed:?}");
        if done == n {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(180),
            "only {done}/{n} succeeded; log tail:\n{}",
            tail(&f.operator.logs(), 30)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let wall = t.elapsed();
    for i in 0..n {
        assert_eq!(
            read(&f.host_dir.join(format!("b{i}"))).trim(),
            format!("b{i}")
        );
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .unwrap_or("VmHWM: ?")
        .to_string();
    println!(
        "FIGURES: {n} concurrent null builds: wall {:.1}s, operator peak RSS {hwm}",
        wall.as_secs_f64()
    );
}
