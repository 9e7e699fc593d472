//! Chaos: amazon-ebs builds while the operator is SIGKILLed, objects are deleted and
//! specs change at random moments, and EC2 loses replies, throttles and refuses
//! snapshot deletions at random. Then a full inventory of every region used: nothing
//! temporary is left, and the only images (and snapshots) are those of builds whose
//! every step succeeded and that were not deleted with `artifactPolicy: Delete`;
//! every such image is still there.
//!
//! Bounded (about two minutes). The seed is printed: `KILN_CHAOS_SEED=<n>` replays
//! the same choices (timing on a loaded machine still varies).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Ec2Server, Fixture, wait_until};
use futures::StreamExt;
use kiln::api::{BuildPhase, ImageBuild, StepPhase};
use kube::ResourceExt;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::watcher;
use serde_json::{Value, json};

const REGIONS: [&str; 2] = ["us-east-1", "eu-west-1"];
const CHAOS: Duration = Duration::from_secs(60);

/// xorshift64*: reproducible from the printed seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What the test saw of each build (by uid), from a watch on every change.
#[derive(Default, Debug)]
struct Seen {
    /// Generations whose every step the status showed Succeeded.
    succeeded: BTreeMap<String, BTreeSet<i64>>,
    /// Whether the object asked for `artifactPolicy: Delete`.
    delete_policy: BTreeMap<String, bool>,
    names: BTreeMap<String, String>,
}

fn observe(seen: &Mutex<Seen>, ib: &ImageBuild) {
    let Some(uid) = ib.uid() else { return };
    let mut s = seen.lock().unwrap();
    s.names.insert(uid.clone(), ib.name_any());
    s.delete_policy.insert(
        uid.clone(),
        ib.spec.artifact_policy == kiln::api::ArtifactPolicy::Delete,
    );
    if let Some(st) = &ib.status
        && let Some(g) = st.observed_generation
        && !st.steps.is_empty()
        && st.steps.iter().all(|r| r.phase == StepPhase::Succeeded)
    {
        s.succeeded.entry(uid).or_default().insert(g);
    }
}

fn spec_change(rng: &mut Rng) -> Value {
    json!({"spec": {"provisioners": [{"shell": {"inline": [format!("sleep 0.{}", rng.below(9))]}}]}})
}

/// Creates an amazon-ebs build, copied to a second region or not, with either
/// policy; returns its uid.
async fn create_build(
    f: &Fixture,
    ec2: &Ec2Server,
    source_ami: &str,
    name: &str,
    rng: &mut Rng,
) -> String {
    let regions = if rng.below(2) == 0 {
        json!(["eu-west-1"])
    } else {
        json!([])
    };
    let mut b = common::ebs_build(
        f,
        ec2,
        source_ami,
        name,
        json!({"amiRegions": regions}),
        json!([{"shell": {"inline": [format!("sleep 0.{}", rng.below(9))]}}]),
    );
    if rng.below(3) == 0 {
        b["spec"]["artifactPolicy"] = json!("Delete");
    }
    f.create(&b).await.unwrap().uid().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn builds_survive_kills_deletes_spec_changes_and_ec2_faults() {
    let seed = std::env::var("KILN_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("CHAOS SEED={seed} (replay with KILN_CHAOS_SEED={seed})");
    let mut rng = Rng(seed);
    let mut f = Fixture::new("chaos").await;
    let ec2 = Ec2Server::from_env(&f.env);
    ec2.control("DELETE", "/_kiln/faults", None);
    ec2.control(
        "POST",
        "/_kiln/delays",
        Some(json!({"boot": 0.5, "stop": 0.3, "image": 1, "copy": 1, "terminate": 0.3})),
    );
    let source_ami = common::aws_setup(&f, &ec2).await;
    let faults = json!([
        {"action": "*", "code": "InternalError", "when": "after", "count": 0,
         "probability": 0.04, "seed": seed},
        {"action": "*", "code": "RequestLimitExceeded", "count": 0,
         "probability": 0.04, "seed": seed.wrapping_add(1)},
        {"action": "DeleteSnapshot", "code": "InvalidSnapshot.InUse", "count": 0,
         "probability": 0.3, "seed": seed.wrapping_add(2)},
    ]);
    ec2.control("POST", "/_kiln/faults", Some(faults));

    let api = f.api();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let watch = tokio::spawn({
        let (api, seen) = (api.clone(), seen.clone());
        async move {
            let mut events = watcher(api, watcher::Config::default()).boxed();
            while let Some(e) = events.next().await {
                match e {
                    Ok(watcher::Event::Apply(ib) | watcher::Event::InitApply(ib)) => {
                        observe(&seen, &ib)
                    }
                    Ok(_) => {}
                    Err(e) => eprintln!("watch: {e}"),
                }
            }
        }
    });

    let mut live: Vec<String> = Vec::new();
    let mut uids: BTreeSet<String> = BTreeSet::new();
    let mut n = 0;
    for _ in 0..4 {
        n += 1;
        let name = format!("b{n}");
        uids.insert(create_build(&f, &ec2, &source_ami, &name, &mut rng).await);
        live.push(name);
    }
    let started = Instant::now();
    let mut log = Vec::new();
    while started.elapsed() < CHAOS {
        tokio::time::sleep(Duration::from_millis(300 + rng.below(2200))).await;
        let t = started.elapsed().as_secs_f64();
        match rng.below(10) {
            0..=2 => {
                log.push(format!("{t:.1}s kill the operator"));
                f.restart_operator();
            }
            3..=4 if !live.is_empty() => {
                let name = live.remove(rng.below(live.len() as u64) as usize);
                log.push(format!("{t:.1}s delete {name}"));
                api.delete(&name, &DeleteParams::default()).await.unwrap();
            }
            5..=7 if !live.is_empty() => {
                let name = &live[rng.below(live.len() as u64) as usize];
                log.push(format!("{t:.1}s change the spec of {name}"));
                api.patch(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(spec_change(&mut rng)),
                )
                .await
                .unwrap();
            }
            _ => {
                n += 1;
                let name = format!("b{n}");
                log.push(format!("{t:.1}s create {name}"));
                uids.insert(create_build(&f, &ec2, &source_ami, &name, &mut rng).await);
                live.push(name);
            }
        }
    }
    println!("CHAOS actions:\n  {}", log.join("\n  "));
    // Calm: no more faults; everything settles.
    ec2.control("DELETE", "/_kiln/faults", None);
    let settle = Instant::now();
    wait_until(
        Duration::from_secs(100),
        "every build to settle",
        || async {
            let list = api.list(&Default::default()).await.ok()?;
            let settled = list.items.iter().all(|ib| {
                let st = ib.status.as_ref();
                ib.metadata.deletion_timestamp.is_none()
                    && st.and_then(|s| s.observed_generation) == ib.metadata.generation
                    && matches!(
                        st.and_then(|s| s.phase),
                        Some(BuildPhase::Succeeded | BuildPhase::Failed)
                    )
            });
            settled.then_some(())
        },
    )
    .await;
    println!(
        "FIGURES: chaos settled {:.1}s after the faults stopped",
        settle.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    watch.abort();

    // Inventory of every region used.
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let existing: BTreeMap<String, ImageBuild> = api
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|ib| (ib.uid().unwrap(), ib))
        .collect();
    let mut problems = Vec::new();
    for uid in &uids {
        let name = seen.names.get(uid).cloned().unwrap_or_default();
        let gone = !existing.contains_key(uid);
        let deleted_with_its_images = gone && seen.delete_policy.get(uid) == Some(&true);
        let succeeded = seen.succeeded.get(uid).cloned().unwrap_or_default();
        // Images that may remain: those of generations whose every step succeeded,
        // unless the object was deleted with artifactPolicy: Delete.
        let mut allowed = Vec::new();
        for region in REGIONS {
            let c = ec2.client(region).await;
            let images = c
                .describe_images()
                .owners("self")
                .filters(common::tag_filter(uid))
                .send()
                .await
                .unwrap();
            for img in images.images() {
                let generation: i64 = img
                    .tags()
                    .iter()
                    .find(|t| t.key() == Some("kiln.dev/generation"))
                    .and_then(|t| t.value())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(-1);
                if !deleted_with_its_images && succeeded.contains(&generation) {
                    allowed.push(img.image_id().unwrap().to_string());
                }
            }
        }
        let leaks = common::leaks_keeping(&ec2, &f.client, &f.ns, uid, &REGIONS, &allowed).await;
        for l in leaks {
            problems.push(format!("{name} ({uid}): leaked {l}"));
        }
        // No finished image is lost: every artifact listed still exists.
        if let Some(ib) = existing.get(uid) {
            for a in &ib.status.as_ref().unwrap().artifacts {
                let id = a.image_id.clone().unwrap();
                if !allowed.contains(&id) {
                    problems.push(format!(
                        "{name}: artifact {id} in {:?} (generation {}) is gone",
                        a.region, a.generation
                    ));
                }
            }
        }
    }
    ec2.control("DELETE", "/_kiln/delays", None);
    println!(
        "FIGURES: chaos {} builds, {} actions, {} still present",
        uids.len(),
        log.len(),
        existing.len()
    );
    assert!(
        problems.is_empty(),
        "seed {seed}:\n{}\nactions:\n{}",
        problems.join("\n"),
        log.join("\n")
    );
}
