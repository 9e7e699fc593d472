//! The benchmark: builds per minute, step-transition overhead, apiserver and EC2
//! requests per build, operator footprint. Not part of the test suite (`#[ignore]`);
//! `bash bench/run.sh` runs it on an environment of its own and writes
//! `bench/results/*.json`.
//!
//! Scenarios come from `KILN_BENCH` (default: all), e.g. `null:10,ebs:1,ebs-delays:10`.
//! Each scenario gets a fresh namespace and a fresh operator process, so its peak RSS
//! and CPU time are that scenario's alone.
//!
//! `pipeline-cron:N` and `pipeline-source:N` measure what an idle ImagePipeline costs:
//! N pipelines build their version 1 (the template trigger), then nothing changes for
//! `KILN_BENCH_IDLE_SECONDS` (default 300) and the window's apiserver requests, status
//! writes, reconciles, EC2 calls and operator CPU are reported per pipeline per hour.
//! `pipeline-cron` has a schedule that never fires in the window (`0 0 1 1 *`): the
//! pure idle cost. `pipeline-source` checks its source every 10 s (`onSourceChange`,
//! amazon-ebs against the EC2 test server); the filter matches one fixed image, so
//! every check finds nothing to do.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use common::{Ec2Server, Fixture, Operator, wait_until};
use futures::StreamExt;
use kiln::api::{BuildPhase, ImageBuild, ImagePipeline};
use kube::ResourceExt;
use serde_json::{Value, json};

/// The scaled-down realistic delay profile (seconds), from the issue.
const DELAYS: [(&str, f64); 4] = [("boot", 3.0), ("stop", 2.0), ("image", 5.0), ("copy", 5.0)];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Null,
    Ebs,
    EbsDelays,
    /// Idle pipelines: a schedule that does not fire in the window.
    PipelineCron,
    /// Idle pipelines: a source check every 10 s that finds the same image.
    PipelineSource,
}

impl Kind {
    fn pipelines(self) -> bool {
        matches!(self, Kind::PipelineCron | Kind::PipelineSource)
    }
}

struct Scenario {
    kind: Kind,
    n: usize,
}

impl Scenario {
    fn name(&self) -> String {
        let k = match self.kind {
            Kind::Null => "null",
            Kind::Ebs => "ebs",
            Kind::EbsDelays => "ebs-delays",
            Kind::PipelineCron => "pipeline-cron",
            Kind::PipelineSource => "pipeline-source",
        };
        let mut name = format!("{k}-n{}", self.n);
        if let Some(poll) = poll_setting() {
            name.push_str(&format!("-poll{poll}"));
        }
        if warmup() > 0 {
            name.push_str(&format!("-warm{}", warmup()));
        }
        name
    }
}

/// `KILN_BENCH_POLL`: the amazon-ebs builds' `pollInterval` instead of the
/// fixtures' 100ms (e.g. `2s`, kiln's default).
fn poll_setting() -> Option<String> {
    std::env::var("KILN_BENCH_POLL")
        .ok()
        .filter(|p| !p.is_empty())
}

/// `KILN_BENCH_WARMUP`: builds of the same spec run one after another before the
/// measured ones, by the same operator (what it learns about wait durations, a
/// long-running operator knows); they count in no figure.
fn warmup() -> usize {
    std::env::var("KILN_BENCH_WARMUP")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(0)
}

fn scenarios() -> Vec<Scenario> {
    let spec = std::env::var("KILN_BENCH").unwrap_or_else(|_| {
        "null:1,null:10,null:100,null:500,ebs:1,ebs:10,ebs:100,ebs-delays:1,ebs-delays:10,ebs-delays:100,\
         pipeline-cron:100,pipeline-source:100"
            .into()
    });
    spec.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            let (k, n) = s.trim().split_once(':').expect("scenario kind:N");
            let kind = match k {
                "null" => Kind::Null,
                "ebs" => Kind::Ebs,
                "ebs-delays" => Kind::EbsDelays,
                "pipeline-cron" => Kind::PipelineCron,
                "pipeline-source" => Kind::PipelineSource,
                other => panic!("unknown scenario kind {other}"),
            };
            Scenario {
                kind,
                n: n.parse().expect("N"),
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "the benchmark: bash bench/run.sh"]
async fn benchmark() {
    let out_dir = common::repo_root().join("bench/results");
    std::fs::create_dir_all(&out_dir).expect("bench/results");
    let machine = machine();
    println!("machine: {machine}");
    for s in scenarios() {
        println!("=== {} ===", s.name());
        let mut result = if s.kind.pipelines() {
            run_idle(&s).await
        } else {
            run(&s).await
        };
        result["machine"] = machine.clone();
        let path = out_dir.join(format!("{}.json", s.name()));
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&result).expect("json") + "\n",
        )
        .expect("write result");
        println!("{}", serde_json::to_string_pretty(&result).expect("json"));
    }
}

async fn run(s: &Scenario) -> Value {
    let mut fx = Fixture::new(&format!("bench-{}", s.name())).await;
    fx.operator.kill();
    let ec2 = (s.kind != Kind::Null).then(|| Ec2Server::from_env(&fx.env));
    let mut source_ami = String::new();
    if let Some(ec2) = &ec2 {
        ec2.control("DELETE", "/_kiln/faults", None);
        ec2.control("DELETE", "/_kiln/delays", None);
        if s.kind == Kind::EbsDelays {
            let delays: serde_json::Map<String, Value> = DELAYS
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            ec2.control("POST", "/_kiln/delays", Some(Value::Object(delays)));
        }
        source_ami = common::aws_setup(&fx, ec2).await;
    }
    let builds: Vec<Value> = (0..s.n)
        .map(|i| {
            let name = format!("b{i}");
            let shell = json!([{"shell": {"inline": ["true"]}}]);
            match &ec2 {
                None => fx.null_build(&name, shell),
                Some(ec2) => {
                    let mut ebs = json!({"amiRegions": ["eu-west-1"], "waitTimeout": "20m"});
                    if let Some(poll) = poll_setting() {
                        ebs["pollInterval"] = json!(poll);
                    }
                    common::ebs_build(&fx, ec2, &source_ami, &name, ebs, shell)
                }
            }
        })
        .collect();

    let log = fx.env.dir.join("logs").join(format!("{}.json.log", fx.ns));
    let _ = std::fs::remove_file(&log);
    let mut op = Operator::start_custom(
        &fx.operator_kubeconfig,
        &fx.ns,
        &log,
        &["--log-format", "json"],
        // The controller's debug "step transition" lines say where a transition's time goes.
        &[("KILN_LOG", "info,kiln::controller=debug")],
    );
    wait_until(Duration::from_secs(30), "operator ready", || async {
        op.http_get("/readyz").await.ok().filter(|(c, _)| *c == 200)
    })
    .await;
    // /readyz waits for the controller's first list, yet the first build after it
    // still took about 2 s longer (measured: null-n1 2.2 s with no pause, 0.26 s with
    // it); the pause keeps the operator's start-up out of every scenario's figures.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let done = |text: &str| {
        common::parse_metric(text, r#"kiln_builds{phase="Succeeded"}"#)
            + common::parse_metric(text, r#"kiln_builds{phase="Failed"}"#)
    };
    for i in 0..warmup() {
        let mut b = builds[0].clone();
        b["metadata"]["name"] = json!(format!("warm{i}"));
        fx.create(&b).await.expect("create the warm-up build");
        wait_until(Duration::from_secs(300), "the warm-up build", || async {
            let text = op.http_get("/metrics").await.ok()?.1;
            (done(&text) as usize > i).then_some(())
        })
        .await;
    }
    let warm = warmup();
    let api_before = apiserver_requests(&fx).await;
    if let Some(ec2) = &ec2 {
        ec2.control("DELETE", "/_kiln/calls", None);
    }
    let cpu_before = cpu_profile(&fx.env);
    let t0 = Instant::now();
    let created: Vec<_> = futures::stream::iter(builds.iter())
        .map(|b| fx.create(b))
        .buffer_unordered(32)
        .collect()
        .await;
    for c in created {
        c.expect("create ImageBuild");
    }
    // Waiting reads the operator's own gauge: the driver adds no apiserver load.
    let timeout = Duration::from_secs(60 + 3 * s.n as u64);
    loop {
        let text = op.http_get("/metrics").await.expect("scrape").1;
        if done(&text) as usize >= s.n + warm {
            break;
        }
        assert!(
            t0.elapsed() < timeout,
            "{}: {} of {} done after {:?}",
            s.name(),
            done(&text),
            s.n,
            t0.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let wall = t0.elapsed().as_secs_f64();
    let pid = op.pid();
    let (peak_rss_mib, cpu_seconds) = footprint(pid);
    let cpu_after = cpu_profile(&fx.env);
    let mut cpu = serde_json::Map::new();
    for (k, v) in &cpu_after {
        let used = v - cpu_before.get(k).copied().unwrap_or(0.0);
        cpu.insert(k.clone(), json!(round(used, 2)));
    }
    cpu.insert(
        "machine_capacity".into(),
        json!(round(wall * machine_cpus(), 2)),
    );
    let api_after = apiserver_requests(&fx).await;
    let ec2_calls = ec2.as_ref().map(|e| e.control("GET", "/_kiln/calls", None));
    let metrics = op.http_get("/metrics").await.expect("scrape").1;

    if let Some(ec2) = &ec2 {
        ec2.control("DELETE", "/_kiln/delays", None);
    }

    let mut list = fx.api().list(&Default::default()).await.expect("list");
    // The warm-up builds are in no figure.
    list.items.retain(|ib| !ib.name_any().starts_with("warm"));
    let mut succeeded = 0;
    let mut steps = 0usize;
    let mut failures = Vec::new();
    for ib in &list.items {
        let st = ib.status.clone().unwrap_or_default();
        steps += st.steps.len();
        if st.phase == Some(BuildPhase::Succeeded) {
            succeeded += 1;
        } else {
            failures.push(format!(
                "{}: {:?} {:?}",
                ib.name_any(),
                st.phase,
                st.message
            ));
        }
    }
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let transitions = transitions(&log_text, &list.items);
    let breakdown = transition_breakdown(&log_text, &fx.ns);

    let n = s.n as f64;
    let delta = |k: &str| {
        api_after.get(k).copied().unwrap_or(0.0) - api_before.get(k).copied().unwrap_or(0.0)
    };
    // The driver's own requests in the window: one create per build.
    let reads = delta("reads");
    let writes = delta("writes") - n;
    let mut by_verb = serde_json::Map::new();
    for (k, _) in api_after.iter().filter(|(k, _)| k.contains(' ')) {
        let v = delta(k) - if k == "POST imagebuilds" { n } else { 0.0 };
        if v > 0.0 {
            by_verb.insert(k.clone(), json!(round(v / n, 2)));
        }
    }
    let ec2_per_build = ec2_calls.map(|c| {
        let mut m = serde_json::Map::new();
        if let Some(actions) = c["actions"].as_object() {
            for (a, v) in actions {
                m.insert(
                    a.clone(),
                    json!(round(v["total"].as_f64().unwrap_or(0.0) / n, 2)),
                );
            }
        }
        m.insert(
            "total".into(),
            json!(round(c["total"].as_f64().unwrap_or(0.0) / n, 2)),
        );
        Value::Object(m)
    });
    let delay_sum: f64 = DELAYS.iter().map(|(_, v)| v).sum();
    let result = json!({
        "scenario": s.name(),
        "builds": s.n,
        "succeeded": succeeded,
        "failures": failures.iter().take(10).collect::<Vec<_>>(),
        "wall_seconds": round(wall, 2),
        "builds_per_minute": round(n / wall * 60.0, 1),
        "steps_per_build": round(steps as f64 / n, 2),
        "transition_ms": percentiles(&transitions),
        "transitions_measured": transitions.len(),
        "transition_breakdown_ms": breakdown,
        "apiserver_per_build": {"reads": round(reads / n, 2), "writes": round(writes / n, 2), "by_verb": by_verb},
        "apiserver_writes_per_step": round(writes / steps.max(1) as f64, 2),
        "ec2_calls_per_build": ec2_per_build,
        "injected_delays_seconds": if s.kind == Kind::EbsDelays { json!(delay_sum) } else { Value::Null },
        "wall_over_delays": if s.kind == Kind::EbsDelays { json!(round(wall / delay_sum, 3)) } else { Value::Null },
        // CPU seconds over the scenario's wall time, by process; machine_busy is every
        // process (the operator, the driver and the build machines' commands too).
        "cpu_seconds": cpu,
        "operator": {
            "peak_rss_mib": round(peak_rss_mib, 1),
            "cpu_seconds": round(cpu_seconds, 2),
            "status_writes": common::parse_metric(&metrics, "kiln_status_writes_total"),
        },
    });
    // Delete the builds while the operator runs (it releases their finalizers), then
    // the namespace: its deletion would count in the next scenario's window.
    let api = fx.api();
    let _ = api
        .delete_collection(&Default::default(), &Default::default())
        .await;
    wait_until(Duration::from_secs(300), "builds deleted", || async {
        api.list(&Default::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;
    op.kill();
    let nss: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(fx.client.clone());
    let _ = nss.delete(&fx.ns, &Default::default()).await;
    wait_until(Duration::from_secs(300), "namespace deleted", || async {
        nss.get_opt(&fx.ns).await.ok()?.is_none().then_some(())
    })
    .await;
    result
}

/// The length of the idle window: `KILN_BENCH_IDLE_SECONDS` (default 300).
fn idle_window() -> Duration {
    let secs = std::env::var("KILN_BENCH_IDLE_SECONDS")
        .ok()
        .map(|v| v.parse().expect("KILN_BENCH_IDLE_SECONDS: seconds"))
        .unwrap_or(300);
    Duration::from_secs(secs)
}

/// Sample lines of one metric family, `name{labels} value`, by their labels.
fn metric_family(text: &str, name: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix('{'))
        .filter_map(|l| {
            let (labels, value) = l.rsplit_once("} ")?;
            Some((labels.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// N pipelines reach version 1, then an idle window: what each costs per hour when
/// its triggers find nothing to do. Nothing but the operator talks to the apiserver
/// in the window (the driver sleeps through it).
async fn run_idle(s: &Scenario) -> Value {
    let window = idle_window();
    let mut fx = Fixture::new(&format!("bench-{}", s.name())).await;
    fx.operator.kill();
    let shell = json!([{"shell": {"inline": ["true"]}}]);
    let (ec2, template, trigger) = match s.kind {
        Kind::PipelineCron => (
            None,
            fx.null_build("t", shell)["spec"].clone(),
            // Midnight of January 1st: not in the window (unless run then).
            json!({"schedule": {"cron": "0 0 1 1 *"}}),
        ),
        _ => {
            let ec2 = Ec2Server::from_env(&fx.env);
            ec2.control("DELETE", "/_kiln/faults", None);
            ec2.control("DELETE", "/_kiln/delays", None);
            // One image named base-<ns>, which nothing else matches or publishes.
            let source_ami = common::aws_setup(&fx, &ec2).await;
            let mut b = common::ebs_build(
                &fx,
                &ec2,
                &source_ami,
                "t",
                json!({
                    "sourceAMI": null,
                    "sourceAMIFilter": {
                        "filters": {"name": format!("base-{}", fx.ns)},
                        "owners": ["self"],
                        "mostRecent": true,
                    },
                }),
                shell,
            );
            // Unique per build: the pipelines share one template.
            b["spec"]["builder"]["amazonEBS"]["amiName"] =
                json!(format!("{}-{{{{ build.name }}}}", fx.ns));
            (
                Some(ec2),
                b["spec"].clone(),
                json!({"onSourceChange": {"checkInterval": "10s"}}),
            )
        }
    };
    let pipelines: Vec<ImagePipeline> = (0..s.n)
        .map(|i| {
            let mut spec = json!({"template": {"spec": template.clone()}});
            for (k, v) in trigger.as_object().expect("trigger") {
                spec[k] = v.clone();
            }
            serde_json::from_value(json!({
                "apiVersion": "kiln.dev/v1alpha1",
                "kind": "ImagePipeline",
                "metadata": {"name": format!("p{i}"), "namespace": fx.ns},
                "spec": spec,
            }))
            .expect("ImagePipeline json")
        })
        .collect();

    let log = fx.env.dir.join("logs").join(format!("{}.json.log", fx.ns));
    let _ = std::fs::remove_file(&log);
    // KILN_BENCH_LOG: the operator's KILN_LOG, for a diagnosis (more log costs the
    // operator CPU that the window would count).
    let level = std::env::var("KILN_BENCH_LOG").unwrap_or_else(|_| "info".into());
    let mut op = Operator::start_custom(
        &fx.operator_kubeconfig,
        &fx.ns,
        &log,
        &["--log-format", "json"],
        &[("KILN_LOG", level.as_str())],
    );
    wait_until(Duration::from_secs(30), "operator ready", || async {
        op.http_get("/readyz").await.ok().filter(|(c, _)| *c == 200)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Version 1 of every pipeline: its template trigger's build.
    let api: kube::Api<ImagePipeline> = kube::Api::namespaced(fx.client.clone(), &fx.ns);
    let t0 = Instant::now();
    let pp = kube::api::PostParams::default();
    let created: Vec<_> = futures::stream::iter(pipelines.iter())
        .map(|p| api.create(&pp, p))
        .buffer_unordered(32)
        .collect()
        .await;
    for c in created {
        c.expect("create ImagePipeline");
    }
    let timeout = Duration::from_secs(120 + 3 * s.n as u64);
    loop {
        let list = api.list(&Default::default()).await.expect("list pipelines");
        let ready = list
            .items
            .iter()
            .filter(|p| {
                p.status.as_ref().is_some_and(|st| {
                    st.latest_version == Some(1) && st.builds.iter().all(|b| b.settled)
                })
            })
            .count();
        if ready == s.n {
            break;
        }
        assert!(
            t0.elapsed() < timeout,
            "{}: {ready} of {} pipelines at version 1 after {:?}; operator log tail:\n{}",
            s.name(),
            s.n,
            t0.elapsed(),
            common::tail(&op.logs(), 40)
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let first_builds = t0.elapsed().as_secs_f64();
    // The writes that follow a version (the reconcile its own status write causes).
    tokio::time::sleep(Duration::from_secs(5)).await;

    // The window: the driver only sleeps.
    let pid = op.pid();
    let metrics_before = op.http_get("/metrics").await.expect("scrape").1;
    let api_before = apiserver_requests(&fx).await;
    if let Some(ec2) = &ec2 {
        ec2.control("DELETE", "/_kiln/calls", None);
    }
    let cpu_before = cpu_profile(&fx.env);
    let op_cpu_before = cpu_seconds(&pid.to_string(), false);
    let w0 = Instant::now();
    tokio::time::sleep(window).await;
    let op_cpu = cpu_seconds(&pid.to_string(), false) - op_cpu_before;
    let cpu_after = cpu_profile(&fx.env);
    let ec2_calls = ec2.as_ref().map(|e| e.control("GET", "/_kiln/calls", None));
    let api_after = apiserver_requests(&fx).await;
    let metrics_after = op.http_get("/metrics").await.expect("scrape").1;
    let secs = w0.elapsed().as_secs_f64();
    let (peak_rss_mib, _) = footprint(pid);

    // Per pipeline per hour.
    let scale = 3600.0 / secs / s.n as f64;
    let delta = |k: &str| {
        api_after.get(k).copied().unwrap_or(0.0) - api_before.get(k).copied().unwrap_or(0.0)
    };
    let mut by_verb = serde_json::Map::new();
    let mut window_by_verb = serde_json::Map::new();
    for (k, _) in api_after.iter().filter(|(k, _)| k.contains(' ')) {
        let v = delta(k);
        if v > 0.0 {
            by_verb.insert(k.clone(), json!(round(v * scale, 2)));
            window_by_verb.insert(k.clone(), json!(v));
        }
    }
    let counter = |text: &str, series: &str| common::parse_metric(text, series);
    let status_writes = counter(&metrics_after, "kiln_status_writes_total")
        - counter(&metrics_before, "kiln_status_writes_total");
    let reconciles_before = metric_family(&metrics_before, "kiln_reconciles_total");
    let mut reconciles = serde_json::Map::new();
    let mut window_reconciles = serde_json::Map::new();
    for (labels, after) in metric_family(&metrics_after, "kiln_reconciles_total") {
        let v = after - reconciles_before.get(&labels).copied().unwrap_or(0.0);
        if v > 0.0 {
            reconciles.insert(labels.clone(), json!(round(v * scale, 2)));
            window_reconciles.insert(labels, json!(v));
        }
    }
    let ec2_per_hour = ec2_calls.as_ref().map(|c| {
        let mut m = serde_json::Map::new();
        if let Some(actions) = c["actions"].as_object() {
            for (a, v) in actions {
                m.insert(
                    a.clone(),
                    json!(round(v["total"].as_f64().unwrap_or(0.0) * scale, 2)),
                );
            }
        }
        m.insert(
            "total".into(),
            json!(round(c["total"].as_f64().unwrap_or(0.0) * scale, 2)),
        );
        Value::Object(m)
    });
    let mut cpu = serde_json::Map::new();
    for (k, v) in &cpu_after {
        let used = v - cpu_before.get(k).copied().unwrap_or(0.0);
        cpu.insert(k.clone(), json!(round(used, 2)));
    }
    cpu.insert(
        "machine_capacity".into(),
        json!(round(secs * machine_cpus(), 2)),
    );

    // Nothing changed: no pipeline started a second build.
    let list = api.list(&Default::default()).await.expect("list pipelines");
    let at_v1 = list
        .items
        .iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.latest_version) == Some(1))
        .count();
    let started: i64 = list
        .items
        .iter()
        .map(|p| p.status.as_ref().map_or(0, |s| s.sequence) - 1)
        .sum();
    let result = json!({
        "scenario": s.name(),
        "pipelines": s.n,
        "trigger": trigger,
        "pipelines_at_version_1": at_v1,
        "builds_started_in_window": started,
        "first_builds_seconds": round(first_builds, 2),
        "window_seconds": round(secs, 1),
        "per_pipeline_per_hour": {
            "apiserver": {
                "reads": round(delta("reads") * scale, 2),
                "writes": round(delta("writes") * scale, 2),
                "by_verb": by_verb,
            },
            "status_writes": round(status_writes * scale, 2),
            "reconciles": reconciles,
            "ec2_calls": ec2_per_hour,
            "operator_cpu_seconds": round(op_cpu * scale, 4),
        },
        "window_totals": {
            "apiserver_by_verb": window_by_verb,
            "status_writes": status_writes,
            "reconciles": window_reconciles,
            "ec2_calls": ec2_calls.as_ref().map(|c| c["total"].clone()),
        },
        // CPU seconds over the window, by process (as for the build scenarios).
        "cpu_seconds": cpu,
        "operator": {
            "peak_rss_mib": round(peak_rss_mib, 1),
            "cpu_seconds": round(op_cpu, 2),
            "cpu_percent_of_a_core": round(op_cpu / secs * 100.0, 2),
        },
    });

    // Pipelines first (the operator releases their finalizers), then their builds.
    let _ = api
        .delete_collection(&Default::default(), &Default::default())
        .await;
    wait_until(Duration::from_secs(300), "pipelines deleted", || async {
        api.list(&Default::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;
    let builds = fx.api();
    let _ = builds
        .delete_collection(&Default::default(), &Default::default())
        .await;
    wait_until(Duration::from_secs(300), "builds deleted", || async {
        builds
            .list(&Default::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;
    op.kill();
    let nss: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(fx.client.clone());
    let _ = nss.delete(&fx.ns, &Default::default()).await;
    wait_until(Duration::from_secs(300), "namespace deleted", || async {
        nss.get_opt(&fx.ns).await.ok()?.is_none().then_some(())
    })
    .await;
    result
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

/// Peak RSS (VmHWM) and user+system CPU seconds of a live process.
fn footprint(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    (hwm_kib / 1024.0, cpu_seconds(&pid.to_string(), false))
}

/// utime + stime of a process from `/proc/PID/stat`, plus its waited-for children's
/// (cutime + cstime) when asked; 0 for a process that is gone.
fn cpu_seconds(pid: &str, children: bool) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    // utime, stime, cutime, cstime are fields 14-17 of stat; `rest` starts at field 3.
    let fields = if children { 11..15 } else { 11..13 };
    let ticks: f64 = fields.filter_map(|i| f.get(i)).sum();
    ticks / 100.0 // USER_HZ on Linux
}

/// CPU seconds used so far by the test servers (children included: sshd's are the
/// per-connection sessions) and by the whole machine, to see where a scenario's CPU
/// goes. Taken before and after; the difference is the scenario's.
fn cpu_profile(env: &common::TestEnv) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (name, file) in [
        ("apiserver_and_etcd", "apiserver.pid"),
        ("sshd", "sshd.pid"),
        ("ec2_server", "ec2.pid"),
    ] {
        let pid = std::fs::read_to_string(env.dir.join(file)).unwrap_or_default();
        out.insert(name.to_string(), cpu_seconds(pid.trim(), true));
    }
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    if let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) {
        let v: Vec<f64> = cpu
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap_or(0.0))
            .collect();
        // user nice system idle iowait irq softirq steal: busy is all but idle and iowait.
        let busy: f64 =
            v.iter().take(8).sum::<f64>() - v.get(3).unwrap_or(&0.0) - v.get(4).unwrap_or(&0.0);
        out.insert("machine_busy".to_string(), busy / 100.0);
    }
    out
}

/// apiserver_request_total summed into reads and writes, over the resources the
/// operator uses (ImagePipelines too) (the apiserver's own lease renewals and controllers excluded), plus
/// a "VERB resource" breakdown.
async fn apiserver_requests(fx: &Fixture) -> BTreeMap<String, f64> {
    let req = http::Request::get("/metrics")
        .body(Vec::new())
        .expect("request");
    let text = fx
        .client
        .request_text(req)
        .await
        .expect("apiserver /metrics");
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let Some((labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let label = |k: &str| {
            labels
                .split(&format!("{k}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("")
                .to_string()
        };
        let resource = label("resource");
        if ![
            "imagebuilds",
            "imagepipelines",
            "secrets",
            "configmaps",
            "events",
        ]
        .contains(&resource.as_str())
            || !label("dry_run").is_empty()
        {
            continue;
        }
        let verb = label("verb");
        let v: f64 = value.parse().unwrap_or(0.0);
        let class = match verb.as_str() {
            "GET" | "LIST" | "WATCH" => "reads",
            _ => "writes",
        };
        let sub = label("subresource");
        let key = if sub.is_empty() {
            format!("{verb} {resource}")
        } else {
            format!("{verb} {resource}/{sub}")
        };
        *out.entry(class.to_string()).or_insert(0.0) += v;
        *out.entry(key).or_insert(0.0) += v;
    }
    out
}

/// Controller overhead between steps, from the operator's JSON log: for each build,
/// from one step's "step succeeded" to the next step's "step started" (a finished
/// step's result is written to status in between, then the next step is spawned).
fn transitions(log: &str, builds: &[ImageBuild]) -> Vec<f64> {
    let ns = builds
        .first()
        .and_then(|b| b.namespace())
        .unwrap_or_default();
    // (build, step) -> (started, succeeded) timestamps in ms.
    let mut seen: HashMap<(String, String), (Option<f64>, Option<f64>)> = HashMap::new();
    for line in log.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let msg = v["message"].as_str().unwrap_or("");
        if msg != "step started" && msg != "step succeeded" {
            continue;
        }
        let span = &v["span"];
        if span["namespace"].as_str() != Some(ns.as_str()) || span["kind"] != "Run" {
            continue;
        }
        let (Some(build), Some(step), Some(ts)) = (
            span["build"].as_str(),
            span["step"].as_str(),
            v["timestamp"].as_str(),
        ) else {
            continue;
        };
        let Ok(t) = ts.parse::<k8s_openapi::jiff::Timestamp>() else {
            continue;
        };
        let ms = t.as_millisecond() as f64 + f64::from(t.subsec_microsecond() % 1000) / 1000.0;
        let e = seen.entry((build.into(), step.into())).or_default();
        if msg == "step started" {
            // A resumed step starts again; the first start is the transition.
            e.0.get_or_insert(ms);
        } else {
            e.1 = Some(ms);
        }
    }
    let mut out = Vec::new();
    for b in builds {
        let name = b.name_any();
        let steps: Vec<String> = b
            .status
            .as_ref()
            .map(|s| s.steps.iter().map(|r| r.name.clone()).collect())
            .unwrap_or_default();
        for pair in steps.windows(2) {
            let prev = seen.get(&(name.clone(), pair[0].clone())).and_then(|e| e.1);
            let next = seen.get(&(name.clone(), pair[1].clone())).and_then(|e| e.0);
            if let (Some(a), Some(b)) = (prev, next) {
                out.push(b - a);
            }
        }
    }
    out
}

/// Where the transitions' time went, as the operator measured it: `queued` from the
/// step's finish to the reconcile that records it, `status_write` for that write.
fn transition_breakdown(log: &str, ns: &str) -> Value {
    let (mut queued, mut write, mut total) = (Vec::new(), Vec::new(), Vec::new());
    for line in log.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if v["message"] != "step transition" || v["span"]["namespace"].as_str() != Some(ns) {
            continue;
        }
        if let (Some(q), Some(w), Some(t)) = (
            v["queued_ms"].as_f64(),
            v["write_ms"].as_f64(),
            v["total_ms"].as_f64(),
        ) {
            queued.push(q);
            write.push(w);
            total.push(t);
        }
    }
    json!({
        "queued": percentiles(&queued),
        "status_write": percentiles(&write),
        "total": percentiles(&total),
    })
}

fn percentiles(v: &[f64]) -> Value {
    if v.is_empty() {
        return json!({"p50": null, "p99": null, "max": null});
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let at = |q: f64| s[((s.len() as f64 - 1.0) * q).round() as usize];
    json!({
        "p50": round(at(0.5), 1),
        "p90": round(at(0.9), 1),
        "p99": round(at(0.99), 1),
        "max": round(s[s.len() - 1], 1),
        "mean": round(s.iter().sum::<f64>() / s.len() as f64, 1),
    })
}

fn machine_cpus() -> f64 {
    std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |k| round(k / 1024.0 / 1024.0, 1));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": model,
        "memory_gib": mem_gib,
        "kernel": kernel.trim(),
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
    })
}
