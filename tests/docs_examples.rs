//! Keeps the docs honest.
//!
//! 1. Every ```yaml block in `docs/*.md` and `README.md` is split into documents
//!    (`---`); each document with `kind: ImageBuild` is created with a server-side
//!    dry run (`dryRun=All`, `fieldValidation=Strict`, so an unknown or misspelt
//!    field is an error rather than silently pruned) against the real apiserver with
//!    the CRD from `crds/` installed. All must be accepted by the schema and its CEL
//!    rules.
//!
//! 2. `docs/reference.md` documents exactly the CRD's fields. Machine-readable
//!    convention: a field row is a Markdown table row whose first cell is one
//!    backticked full path starting with `spec.` or `status.`, `[]` marking list
//!    items, e.g.
//!
//!    | `spec.builder.amazonEBS.sourceAMIFilter.mostRecent` | boolean | default `false` | … |
//!
//!    with the columns path, type, presence, description. The set of those paths
//!    must equal the set of properties under `spec` and `status` in
//!    `crds/imagebuilds.kiln.dev.yaml` (so a new field without documentation fails,
//!    and so does a documented field that does not exist). Each row must also agree
//!    with the schema: the type (`string`, `integer`, `boolean`, `object`, `[]T`,
//!    `map[string]T`), the presence (`required`, `default <value>` in backticks, or
//!    `optional`), every enum value and pattern in backticks, and the numeric bounds.
//!    Every CEL rule and message of the schema must appear verbatim in the page.
//!
//! 3. The examples of `docs/reference.md` cover each builder and each provisioner
//!    variant.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use common::{TestEnv, install, repo_root, short_id};
use k8s_openapi::api::core::v1::Namespace;
use kiln::api::ImageBuild;
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, Resource};
use serde_json::{Value, json};

const REFERENCE: &str = "docs/reference.md";

/// The documents the examples are read from: README.md and docs/*.md.
fn doc_files() -> Vec<PathBuf> {
    let root = repo_root();
    let mut files = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

fn rel(p: &std::path::Path) -> String {
    p.strip_prefix(repo_root())
        .unwrap_or(p)
        .display()
        .to_string()
}

/// One YAML document of a ```yaml block: where it starts and its text.
struct YamlDoc {
    file: String,
    line: usize,
    text: String,
}

fn yaml_docs(file: &str, text: &str) -> Vec<YamlDoc> {
    let mut docs = Vec::new();
    let mut current: Option<YamlDoc> = None;
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        if current.is_none() {
            if t == "```yaml" || t == "```yml" {
                current = Some(YamlDoc {
                    file: file.into(),
                    line: n + 2,
                    text: String::new(),
                });
            }
            continue;
        }
        if t == "```" || t == "---" {
            let doc = current.take().unwrap();
            if !doc.text.trim().is_empty() {
                docs.push(doc);
            }
            if t == "---" {
                current = Some(YamlDoc {
                    file: file.into(),
                    line: n + 2,
                    text: String::new(),
                });
            }
            continue;
        }
        let doc = current.as_mut().unwrap();
        doc.text.push_str(line);
        doc.text.push('\n');
    }
    docs
}

/// A document that says it is an ImageBuild: parsed, or why it does not parse.
struct Example {
    at: String,
    parsed: Result<Value, String>,
}

fn image_build_examples(file: &str, text: &str) -> Vec<Example> {
    let mut out = Vec::new();
    for doc in yaml_docs(file, text) {
        let at = format!("{}:{}", doc.file, doc.line);
        match serde_yaml::from_str::<Value>(&doc.text) {
            Ok(v) if v["kind"] == "ImageBuild" => out.push(Example { at, parsed: Ok(v) }),
            Ok(_) => {}
            Err(e) => {
                if doc.text.lines().any(|l| l.trim() == "kind: ImageBuild") {
                    out.push(Example {
                        at,
                        parsed: Err(format!("not valid YAML: {e}")),
                    });
                }
            }
        }
    }
    out
}

fn all_examples() -> Vec<Example> {
    let mut out = Vec::new();
    for f in doc_files() {
        let text = std::fs::read_to_string(&f).unwrap();
        out.extend(image_build_examples(&rel(&f), &text));
    }
    out
}

// ---------------------------------------------------------------- schema side

fn crd_schema() -> Value {
    let text = std::fs::read_to_string(repo_root().join("crds/imagebuilds.kiln.dev.yaml"))
        .expect("crds/imagebuilds.kiln.dev.yaml");
    let crd: Value = serde_yaml::from_str(&text).expect("CRD YAML");
    let versions = crd["spec"]["versions"].as_array().expect("versions");
    let v = versions
        .iter()
        .find(|v| v["name"] == "v1alpha1")
        .expect("v1alpha1");
    v["schema"]["openAPIV3Schema"].clone()
}

struct SchemaField {
    node: Value,
    required: bool,
}

/// Every property under `spec` and `status`, by full path (`[]` for list items).
fn schema_fields(schema: &Value) -> BTreeMap<String, SchemaField> {
    fn walk(node: &Value, path: &str, out: &mut BTreeMap<String, SchemaField>) {
        let mut node = node;
        let mut path = path.to_string();
        while node["type"] == "array" {
            node = &node["items"];
            path.push_str("[]");
        }
        let required: BTreeSet<&str> = node["required"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if let Some(props) = node["properties"].as_object() {
            for (name, child) in props {
                let p = format!("{path}.{name}");
                out.insert(
                    p.clone(),
                    SchemaField {
                        node: child.clone(),
                        required: required.contains(name.as_str()),
                    },
                );
                walk(child, &p, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    for root in ["spec", "status"] {
        let node = &schema["properties"][root];
        assert!(node.is_object(), "the CRD schema has no {root}");
        walk(node, root, &mut out);
    }
    out
}

fn type_token(node: &Value) -> String {
    match node["type"].as_str() {
        Some("array") => format!("[]{}", type_token(&node["items"])),
        Some("object") if node.get("additionalProperties").is_some() => {
            format!("map[string]{}", type_token(&node["additionalProperties"]))
        }
        Some(t) => t.to_string(),
        None => "?".into(),
    }
}

/// A default as the docs write it: strings bare, everything else as JSON.
fn render(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// Every CEL rule and message anywhere in the schema.
fn cel_rules(node: &Value, out: &mut Vec<(String, String)>) {
    match node {
        Value::Object(m) => {
            if let Some(rules) = m.get("x-kubernetes-validations").and_then(Value::as_array) {
                for r in rules {
                    out.push((
                        r["rule"].as_str().unwrap_or_default().to_string(),
                        r["message"].as_str().unwrap_or_default().to_string(),
                    ));
                }
            }
            for v in m.values() {
                cel_rules(v, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| cel_rules(v, out)),
        _ => {}
    }
}

// ------------------------------------------------------------------ doc side

struct Row {
    line: usize,
    path: String,
    ty: String,
    presence: String,
    text: String,
}

/// Field rows of the reference: table rows whose first cell is `spec.…` or `status.…`.
fn field_rows(text: &str) -> Vec<Row> {
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        if !(t.starts_with("| `spec.") || t.starts_with("| `status.")) {
            continue;
        }
        let cells: Vec<&str> = t.split('|').map(str::trim).collect();
        // "", path, type, presence, description…, ""
        let cell = |i: usize| cells.get(i).copied().unwrap_or("").to_string();
        rows.push(Row {
            line: n + 1,
            path: cell(1).trim_matches('`').to_string(),
            ty: cell(2).trim_matches('`').to_string(),
            presence: cell(3),
            text: t.to_string(),
        });
    }
    rows
}

fn check_row(row: &Row, field: &SchemaField, problems: &mut Vec<String>) {
    let at = format!("{REFERENCE}:{} `{}`", row.line, row.path);
    let node = &field.node;
    let ty = type_token(node);
    if row.ty != ty {
        problems.push(format!(
            "{at}: type is {ty} in the schema, {:?} here",
            row.ty
        ));
    }
    if field.required {
        if row.presence != "required" {
            problems.push(format!(
                "{at}: required in the schema, presence {:?} here",
                row.presence
            ));
        }
    } else if let Some(d) = node.get("default") {
        let want = format!("default `{}`", render(d));
        if row.presence != want {
            problems.push(format!(
                "{at}: the schema's default gives presence {want:?}, {:?} here",
                row.presence
            ));
        }
    } else if row.presence != "optional" {
        problems.push(format!(
            "{at}: optional without default in the schema, presence {:?} here",
            row.presence
        ));
    }
    for v in node["enum"].as_array().into_iter().flatten() {
        if let Some(v) = v.as_str()
            && !row.text.contains(&format!("`{v}`"))
        {
            problems.push(format!("{at}: enum value `{v}` is not mentioned"));
        }
    }
    if let Some(p) = node["pattern"].as_str()
        && !row.text.contains(&format!("`{p}`"))
    {
        problems.push(format!("{at}: pattern `{p}` is not mentioned"));
    }
    for key in [
        "minLength",
        "maxLength",
        "minItems",
        "maxItems",
        "minimum",
        "maximum",
    ] {
        if let Some(v) = node.get(key) {
            let n = render(v);
            if n != "0" && !row.text.contains(&n) {
                problems.push(format!("{at}: {key} {n} is not mentioned"));
            }
        }
    }
}

#[test]
fn reference_documents_exactly_the_crd_fields() {
    let schema = crd_schema();
    let fields = schema_fields(&schema);
    assert!(
        fields.len() > 50,
        "only {} fields in the schema",
        fields.len()
    );
    let text = std::fs::read_to_string(repo_root().join(REFERENCE)).expect(REFERENCE);
    let rows = field_rows(&text);
    let mut problems = Vec::new();

    let mut seen = BTreeMap::new();
    for row in &rows {
        if let Some(first) = seen.insert(row.path.clone(), row.line) {
            problems.push(format!(
                "{REFERENCE}:{} `{}` is already documented at line {first}",
                row.line, row.path
            ));
        }
        match fields.get(&row.path) {
            Some(f) => check_row(row, f, &mut problems),
            None => problems.push(format!(
                "{REFERENCE}:{} documents `{}`, which is not in the CRD schema",
                row.line, row.path
            )),
        }
    }
    for path in fields.keys() {
        if !seen.contains_key(path) {
            problems.push(format!(
                "{REFERENCE}: `{path}` is in the CRD schema but not documented (add a row starting with | `{path}` |)"
            ));
        }
    }

    let mut rules = Vec::new();
    cel_rules(&schema, &mut rules);
    assert!(!rules.is_empty(), "no CEL rules in the schema");
    for (rule, message) in rules {
        if !text.contains(&format!("`{rule}`")) {
            problems.push(format!("{REFERENCE}: CEL rule `{rule}` is not listed"));
        }
        if !text.contains(&format!("`{message}`")) {
            problems.push(format!(
                "{REFERENCE}: CEL message `{message}` is not listed"
            ));
        }
    }

    assert!(
        problems.is_empty(),
        "{REFERENCE} and the CRD disagree ({} problems):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

#[test]
fn reference_has_an_example_of_each_builder_and_provisioner() {
    let text = std::fs::read_to_string(repo_root().join(REFERENCE)).unwrap();
    let examples: Vec<Value> = image_build_examples(REFERENCE, &text)
        .into_iter()
        .map(|e| e.parsed.unwrap_or_else(|why| panic!("{}: {why}", e.at)))
        .collect();
    let provisioners = || {
        examples.iter().flat_map(|e| {
            e["spec"]["provisioners"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
    };
    let has = |f: &dyn Fn(&Value) -> bool| provisioners().any(|p| f(&p));
    let wanted: Vec<(&str, bool)> = vec![
        (
            "null builder",
            examples
                .iter()
                .any(|e| e["spec"]["builder"].get("null").is_some()),
        ),
        (
            "amazonEBS builder",
            examples
                .iter()
                .any(|e| e["spec"]["builder"]["amazonEBS"].is_object()),
        ),
        ("shell inline", has(&|p| p["shell"]["inline"].is_array())),
        (
            "shell scriptFrom",
            has(&|p| p["shell"]["scriptFrom"]["configMapKeyRef"].is_object()),
        ),
        (
            "shell env from a Secret",
            has(&|p| {
                p["shell"]["env"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|e| e["valueFrom"]["secretKeyRef"].is_object())
            }),
        ),
        (
            "shell expectDisconnect",
            has(&|p| p["shell"]["expectDisconnect"] == true),
        ),
        (
            "file from a ConfigMap",
            has(&|p| p["file"]["from"]["configMapKeyRef"].is_object()),
        ),
        (
            "file from a Secret",
            has(&|p| p["file"]["from"]["secretKeyRef"].is_object()),
        ),
    ];
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(w, _)| *w)
        .collect();
    assert!(
        missing.is_empty(),
        "{REFERENCE} has no complete ImageBuild example of: {}",
        missing.join(", ")
    );
}

// --------------------------------------------------------------- apiserver

/// POST with `dryRun=All` and `fieldValidation=Strict`: nothing is stored, and an
/// unknown field is refused instead of pruned.
async fn dry_run_create(client: &Client, ns: &str, obj: &Value) -> Result<(), String> {
    let path = ImageBuild::url_path(&(), Some(ns));
    let pp = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let mut req = kube::core::Request::new(path)
        .create(&pp, serde_json::to_vec(obj).unwrap())
        .map_err(|e| e.to_string())?;
    let uri = format!("{}&fieldValidation=Strict", req.uri());
    *req.uri_mut() = uri.parse().map_err(|e| format!("{uri}: {e}"))?;
    client
        .request::<Value>(req)
        .await
        .map(|_| ())
        .map_err(|e| match e {
            kube::Error::Api(s) => format!("{} ({}): {}", s.reason, s.code, s.message),
            other => other.to_string(),
        })
}

fn in_namespace(obj: &Value, ns: &str) -> Value {
    let mut o = obj.clone();
    o["metadata"]["namespace"] = json!(ns);
    o
}

#[tokio::test(flavor = "multi_thread")]
async fn doc_examples_are_accepted_by_the_apiserver() {
    let env = TestEnv::load();
    install(&env).await;
    let client = env.admin().await;
    let ns = format!("docs-{}", short_id());
    let nss: Api<Namespace> = Api::all(client.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
    )
    .await
    .unwrap();

    let examples = all_examples();
    let mut problems = Vec::new();
    let mut accepted = Vec::new();
    for ex in &examples {
        match &ex.parsed {
            Err(why) => problems.push(format!("{}: {why}", ex.at)),
            Ok(obj) => match dry_run_create(&client, &ns, &in_namespace(obj, &ns)).await {
                Ok(()) => accepted.push(ex.at.clone()),
                Err(why) => problems.push(format!("{}: refused: {why}", ex.at)),
            },
        }
    }
    println!("ImageBuild examples accepted by the apiserver (dry run):");
    for at in &accepted {
        println!("  {at}");
    }

    // The check itself must be able to fail: a misspelt field and a missing
    // required one are refused through the same path.
    let reference = examples
        .iter()
        .find(|e| e.at.starts_with(REFERENCE))
        .and_then(|e| e.parsed.as_ref().ok())
        .expect("docs/reference.md has ImageBuild examples");
    let mut misspelt = in_namespace(reference, &ns);
    misspelt["spec"]["onErorr"] = json!("keep");
    let r = dry_run_create(&client, &ns, &misspelt).await;
    assert!(
        r.as_ref().is_err_and(|e| e.contains("onErorr")),
        "an unknown field must be refused under strict field validation: {r:?}"
    );
    let mut incomplete = in_namespace(reference, &ns);
    incomplete["spec"]["communicator"]["ssh"]
        .as_object_mut()
        .unwrap()
        .remove("hostKey");
    let r = dry_run_create(&client, &ns, &incomplete).await;
    assert!(
        r.as_ref().is_err_and(|e| e.contains("hostKey")),
        "a missing required field must be refused: {r:?}"
    );

    let _ = nss.delete(&ns, &DeleteParams::default()).await;
    assert!(
        problems.is_empty(),
        "ImageBuild examples in the docs that the apiserver refuses:\n  {}",
        problems.join("\n  ")
    );
}
