//! Build facts, one table (issue 5/6, item 4): the `KILN_*` variables a provisioner
//! receives are exactly the ones the table "Build facts" of docs/reference.md lists
//! for its builder, with a pipeline's two more. Against the real apiserver, EC2
//! server and sshd: each build's shell step writes the names it sees.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::aws::Aws;
use common::{FactRow, Fixture};
use kiln::api::{BuildPhase, ImagePipeline};
use kube::Api;
use kube::api::PostParams;
use serde_json::{Value, json};

fn expected(rows: &BTreeMap<String, FactRow>, builder: &str, pipeline: bool) -> BTreeSet<String> {
    common::facts_for(rows, builder, pipeline)
        .into_iter()
        .map(|(env, _)| env)
        .collect()
}

/// A shell step that writes the names of the `KILN_*` variables it sees.
fn dump(f: &Fixture, file: &str) -> Value {
    let path = f.host_dir.join(file);
    json!([{"shell": {"inline": [format!(
        "env | grep -o '^KILN_[A-Za-z0-9_]*' | sort -u > {}",
        path.display()
    )]}}])
}

fn seen(f: &Fixture, file: &str) -> BTreeSet<String> {
    std::fs::read_to_string(f.host_dir.join(file))
        .unwrap_or_else(|e| panic!("{file}: {e}"))
        .lines()
        .map(str::to_string)
        .collect()
}

fn compare(what: &str, seen: &BTreeSet<String>, want: &BTreeSet<String>) -> Vec<String> {
    let mut problems = Vec::new();
    for n in seen.difference(want) {
        problems.push(format!("{what}: {n} is received but not in the table"));
    }
    for n in want.difference(seen) {
        problems.push(format!("{what}: {n} is in the table but not received"));
    }
    problems
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provisioner_receives_exactly_the_build_facts_the_table_lists() {
    let rows = common::facts_table();
    let a = Aws::new("facts").await;
    let f = &a.f;
    f.create(&f.null_build("null", dump(f, "null")))
        .await
        .unwrap();
    f.create(&a.build("ebs", json!({}), dump(f, "ebs")))
        .await
        .unwrap();
    // A pipeline's build: the same null build, made by an ImagePipeline.
    let template = f.null_build("t", dump(f, "pipeline"));
    let pipeline: ImagePipeline = serde_json::from_value(json!({
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "ImagePipeline",
        "metadata": {"name": "facts", "namespace": f.ns},
        "spec": {"template": {"spec": template["spec"]}},
    }))
    .unwrap();
    Api::<ImagePipeline>::namespaced(f.client.clone(), &f.ns)
        .create(&PostParams::default(), &pipeline)
        .await
        .unwrap();
    for name in ["null", "ebs", "facts-1"] {
        if name == "facts-1" {
            common::wait_until(Duration::from_secs(60), "the pipeline's build", || async {
                f.api().get_opt(name).await.ok().flatten().map(|_| ())
            })
            .await;
        }
        f.wait_phase(name, BuildPhase::Succeeded, Duration::from_secs(120))
            .await;
    }
    let mut problems = Vec::new();
    problems.extend(compare(
        "null",
        &seen(f, "null"),
        &expected(&rows, "null", false),
    ));
    problems.extend(compare(
        "amazon-ebs",
        &seen(f, "ebs"),
        &expected(&rows, "amazon-ebs", false),
    ));
    problems.extend(compare(
        "a pipeline's null build",
        &seen(f, "pipeline"),
        &expected(&rows, "null", true),
    ));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
