//! Build facts, one table (issue 5/6, item 4): the `KILN_*` variables a provisioner
//! receives are exactly the ones the table "Build facts" of docs/reference.md lists
//! for its builder, with a pipeline's two more. Against the real apiserver, EC2
//! server and sshd: each build's shell step writes the names it sees.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::aws::Aws;
use common::{Fixture, repo_root};
use kiln::api::{BuildPhase, ImagePipeline};
use kube::Api;
use kube::api::PostParams;
use serde_json::{Value, json};

/// The rows of the table: variable → the builders the table gives it for
/// (`null`, `amazon-ebs`; `pipeline` for a pipeline's builds only).
fn table() -> BTreeMap<String, BTreeSet<String>> {
    let text = std::fs::read_to_string(repo_root().join("docs/reference.md")).unwrap();
    let start = text
        .find("\n### Build facts\n")
        .expect("docs/reference.md has a ### Build facts section");
    let section = &text[start + 1..];
    let end = section[4..].find("\n#").map_or(section.len(), |i| i + 4);
    let mut rows = BTreeMap::new();
    for line in section[..end].lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 4 {
            continue;
        }
        let Some(name) = cells[1].strip_prefix('`').and_then(|c| c.strip_suffix('`')) else {
            continue;
        };
        if !name.starts_with("KILN_") {
            continue;
        }
        let builders = cells[2]
            .split(',')
            .map(|b| b.trim().trim_matches('`').to_string())
            .filter(|b| !b.is_empty())
            .collect();
        rows.insert(name.to_string(), builders);
    }
    assert!(!rows.is_empty(), "no rows in ### Build facts");
    rows
}

fn expected(
    rows: &BTreeMap<String, BTreeSet<String>>,
    builder: &str,
    pipeline: bool,
) -> BTreeSet<String> {
    rows.iter()
        .filter(|(_, b)| b.contains(builder) || (pipeline && b.contains("pipeline")))
        .map(|(n, _)| n.clone())
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
    let rows = table();
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
