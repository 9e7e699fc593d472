//! Keeps the docs honest.
//!
//! 1. Every ```yaml block in `docs/*.md` and `README.md` is split into documents
//!    (`---`), and so is every `examples/*.yaml` file (with the `${…}` placeholders
//!    that `examples/demo.sh` fills in replaced by the sample values of
//!    [`PLACEHOLDERS`]). Each document with `kind: ImageBuild` or
//!    `kind: ImagePipeline` is created with a server-side dry run (`dryRun=All`,
//!    `fieldValidation=Strict`, so an unknown or misspelt field is an error rather
//!    than silently pruned) against the real apiserver with the CRDs from `crds/`
//!    installed. All must be accepted by the schema and its CEL rules. An
//!    ImagePipeline must also pass what the controller checks before its first build
//!    and the schema cannot: its schedule parses with kiln's cron parser and time
//!    zone lookup, its template passes the builder's plan and admission (with no
//!    endpoint allowed) and makes a different AMI name for every build, and its name
//!    is at most 63 characters.
//!
//! 2. `docs/reference.md` documents exactly the CRDs' fields. The page has two parts:
//!    everything before the line `# ImagePipeline reference` documents ImageBuild
//!    (`crds/imagebuilds.kiln.dev.yaml`), everything from that line on documents
//!    ImagePipeline (`crds/imagepipelines.kiln.dev.yaml`). The line must appear
//!    exactly once. Machine-readable convention, the same in both parts: a field row
//!    is a Markdown table row whose first cell is one backticked full path starting
//!    with `spec.` or `status.`, `[]` marking list items, e.g.
//!
//!    | `spec.builder.amazonEBS.sourceAMIFilter.mostRecent` | boolean | default `false` | … |
//!
//!    with the columns path, type, presence, description. In each part, the set of
//!    those paths must equal the set of properties under `spec` and `status` of that
//!    part's CRD (so a new field without documentation fails, and so does a
//!    documented field that does not exist, or one documented in the wrong part).
//!    Each row must also agree with the schema: the type (`string`, `integer`,
//!    `boolean`, `object`, `[]T`, `map[string]T`), the presence (`required`,
//!    `default <value>` in backticks, or `optional`), every enum value and pattern
//!    in backticks, and the numeric bounds (lengths, items, properties, values).
//!    Every CEL rule and message of a CRD must appear verbatim, in backticks, in its
//!    part of the page.
//!
//!    One exception: ImagePipeline's `spec.template.spec` is an ImageBuild spec. It
//!    is documented as one row (`spec.template.spec` | object | required | …), and
//!    the properties below it are not rows of the pipeline part: the test asserts
//!    that its schema is the ImageBuild CRD's `spec` schema (descriptions aside), so
//!    the ImageBuild part's `spec.…` rows and CEL rules document it.
//!
//! 3. The examples of `docs/reference.md` cover each builder and provisioner variant
//!    (ImageBuild part), and each trigger, retention and the output ConfigMap
//!    (ImagePipeline part).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use common::{TestEnv, install, repo_root, short_id};
use k8s_openapi::api::core::v1::Namespace;
use kiln::api::{ImageBuild, ImagePipeline};
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, Resource};
use serde_json::{Value, json};

const REFERENCE: &str = "docs/reference.md";
/// The line of `docs/reference.md` where the ImagePipeline part starts.
const PIPELINE_HEADING: &str = "# ImagePipeline reference";
const BUILD_CRD: &str = "crds/imagebuilds.kiln.dev.yaml";
const PIPELINE_CRD: &str = "crds/imagepipelines.kiln.dev.yaml";
/// The kinds whose examples are dry-run created.
const KINDS: [&str; 2] = ["ImageBuild", "ImagePipeline"];

/// Sample values for the placeholders `examples/demo.sh` fills into `examples/*.yaml`.
const PLACEHOLDERS: [(&str, &str); 5] = [
    ("KILN_EC2_ENDPOINT", "http://127.0.0.1:4566"),
    ("KILN_SSH_USER", "kiln-build"),
    ("KILN_SSH_HOST", "127.0.0.1"),
    ("KILN_SSH_PORT", "2222"),
    ("KILN_DEMO_DIR", "/tmp/kiln-demo"),
];

/// The documents the examples are read from: README.md and docs/*.md.
fn doc_files() -> Vec<PathBuf> {
    let root = repo_root();
    let mut files = vec![root.join("README.md")];
    files.extend(files_in(&root.join("docs"), &["md"]));
    files
}

/// The example manifests: examples/*.yaml.
fn example_files() -> Vec<PathBuf> {
    files_in(&repo_root().join("examples"), &["yaml", "yml"])
}

fn files_in(dir: &Path, extensions: &[&str]) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| extensions.iter().any(|x| e == *x))
        })
        .collect();
    files.sort();
    files
}

fn rel(p: &Path) -> String {
    p.strip_prefix(repo_root())
        .unwrap_or(p)
        .display()
        .to_string()
}

/// One YAML document of a ```yaml block or a YAML file: where it starts and its text.
struct YamlDoc {
    file: String,
    line: usize,
    text: String,
}

/// The documents of the ```yaml blocks of a Markdown file.
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

/// The documents of a YAML file.
fn yaml_file_docs(file: &str, text: &str) -> Vec<YamlDoc> {
    let mut docs = Vec::new();
    let mut current = YamlDoc {
        file: file.into(),
        line: 1,
        text: String::new(),
    };
    for (n, line) in text.lines().enumerate() {
        if line.trim_end() == "---" {
            let next = YamlDoc {
                file: file.into(),
                line: n + 2,
                text: String::new(),
            };
            docs.push(std::mem::replace(&mut current, next));
            continue;
        }
        current.text.push_str(line);
        current.text.push('\n');
    }
    docs.push(current);
    docs
}

/// Replaces the `${NAME}` placeholders of an example file by [`PLACEHOLDERS`]; a
/// placeholder without a sample value is an error.
fn fill_placeholders(text: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        if len == 0 || !after[len..].starts_with('}') {
            // Not a placeholder (e.g. `${...}` in a comment).
            out.push_str("${");
            rest = after;
            continue;
        }
        let name = &after[..len];
        match PLACEHOLDERS.iter().find(|(n, _)| *n == name) {
            Some((_, value)) => out.push_str(value),
            None => {
                return Err(format!(
                    "unknown placeholder ${{{name}}}: give it a sample value in PLACEHOLDERS of tests/docs_examples.rs"
                ));
            }
        }
        rest = &after[len + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A document that says it is an ImageBuild or an ImagePipeline: parsed, or why it
/// does not parse.
struct Example {
    at: String,
    kind: &'static str,
    parsed: Result<Value, String>,
}

fn kiln_examples(docs: Vec<YamlDoc>) -> Vec<Example> {
    let mut out = Vec::new();
    for doc in docs {
        let at = format!("{}:{}", doc.file, doc.line);
        match serde_yaml::from_str::<Value>(&doc.text) {
            Ok(v) => {
                if let Some(kind) = KINDS.iter().find(|k| v["kind"] == **k) {
                    out.push(Example {
                        at,
                        kind,
                        parsed: Ok(v),
                    });
                }
            }
            Err(e) => {
                let said = KINDS
                    .iter()
                    .find(|k| doc.text.lines().any(|l| l.trim() == format!("kind: {k}")));
                if let Some(kind) = said {
                    out.push(Example {
                        at,
                        kind,
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
        out.extend(kiln_examples(yaml_docs(&rel(&f), &text)));
    }
    for f in example_files() {
        let text = std::fs::read_to_string(&f).unwrap();
        match fill_placeholders(&text) {
            Ok(text) => out.extend(kiln_examples(yaml_file_docs(&rel(&f), &text))),
            Err(why) => {
                // Still report every kiln object of the file as refused.
                for mut ex in kiln_examples(yaml_file_docs(&rel(&f), &text)) {
                    ex.parsed = Err(why.clone());
                    out.push(ex);
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------- schema side

fn crd_schema(file: &str) -> Value {
    let text = std::fs::read_to_string(repo_root().join(file)).expect(file);
    let crd: Value = serde_yaml::from_str(&text).expect("CRD YAML");
    let versions = crd["spec"]["versions"].as_array().expect("versions");
    let v = versions
        .iter()
        .find(|v| v["name"] == "v1alpha1")
        .expect("v1alpha1");
    v["schema"]["openAPIV3Schema"].clone()
}

/// The ImagePipeline schema with `spec.template.spec` cut down to a bare object,
/// and the schema that was cut out.
fn pipeline_schema() -> (Value, Value) {
    let mut schema = crd_schema(PIPELINE_CRD);
    let node = &mut schema["properties"]["spec"]["properties"]["template"]["properties"]["spec"];
    assert!(
        node["properties"].is_object(),
        "{PIPELINE_CRD} has no spec.template.spec"
    );
    let template_spec = std::mem::replace(node, json!({"type": "object"}));
    (schema, template_spec)
}

/// The schema without its descriptions.
fn without_descriptions(node: &Value) -> Value {
    match node {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| *k != "description")
                .map(|(k, v)| (k.clone(), without_descriptions(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_descriptions).collect()),
        other => other.clone(),
    }
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

/// One part of the reference: the lines of one kind, and the number of the line
/// before its first (for messages).
struct Part {
    kind: &'static str,
    offset: usize,
    text: String,
}

/// The reference split at [`PIPELINE_HEADING`]: the ImageBuild part, the
/// ImagePipeline part.
fn reference_parts() -> (Part, Part) {
    let text = std::fs::read_to_string(repo_root().join(REFERENCE)).expect(REFERENCE);
    let lines: Vec<&str> = text.lines().collect();
    let at: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.trim_end() == PIPELINE_HEADING)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        at.len(),
        1,
        "{REFERENCE} must have the line {PIPELINE_HEADING:?} exactly once (it starts the ImagePipeline part); found at lines {:?}",
        at.iter().map(|i| i + 1).collect::<Vec<_>>()
    );
    let split = at[0];
    (
        Part {
            kind: "ImageBuild",
            offset: 0,
            text: lines[..split].join("\n"),
        },
        Part {
            kind: "ImagePipeline",
            offset: split,
            text: lines[split..].join("\n"),
        },
    )
}

struct Row {
    line: usize,
    path: String,
    ty: String,
    presence: String,
    text: String,
}

/// Field rows of a part: table rows whose first cell is `spec.…` or `status.…`.
fn field_rows(part: &Part) -> Vec<Row> {
    let mut rows = Vec::new();
    for (n, line) in part.text.lines().enumerate() {
        let t = line.trim();
        if !(t.starts_with("| `spec.") || t.starts_with("| `status.")) {
            continue;
        }
        let cells: Vec<&str> = t.split('|').map(str::trim).collect();
        // "", path, type, presence, description…, ""
        let cell = |i: usize| cells.get(i).copied().unwrap_or("").to_string();
        rows.push(Row {
            line: part.offset + n + 1,
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
        "minProperties",
        "maxProperties",
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

/// What is wrong between one part of the reference and its CRD schema.
fn part_problems(part: &Part, schema: &Value, crd: &str) -> Vec<String> {
    let fields = schema_fields(schema);
    let rows = field_rows(part);
    let kind = part.kind;
    let mut problems = Vec::new();

    let mut seen = BTreeMap::new();
    for row in &rows {
        if let Some(first) = seen.insert(row.path.clone(), row.line) {
            problems.push(format!(
                "{REFERENCE}:{} `{}` is already documented at line {first} ({kind} part)",
                row.line, row.path
            ));
        }
        match fields.get(&row.path) {
            Some(f) => check_row(row, f, &mut problems),
            None => problems.push(format!(
                "{REFERENCE}:{} documents `{}` in the {kind} part, which is not in {crd}",
                row.line, row.path
            )),
        }
    }
    for path in fields.keys() {
        if !seen.contains_key(path) {
            problems.push(format!(
                "{REFERENCE}: `{path}` is in {crd} but not documented in the {kind} part (add a row starting with | `{path}` |)"
            ));
        }
    }

    let mut rules = Vec::new();
    cel_rules(schema, &mut rules);
    assert!(!rules.is_empty(), "no CEL rules in {crd}");
    for (rule, message) in rules {
        if !part.text.contains(&format!("`{rule}`")) {
            problems.push(format!(
                "{REFERENCE}: CEL rule `{rule}` of {crd} is not listed in the {kind} part"
            ));
        }
        if !part.text.contains(&format!("`{message}`")) {
            problems.push(format!(
                "{REFERENCE}: CEL message `{message}` of {crd} is not listed in the {kind} part"
            ));
        }
    }
    problems
}

fn assert_no_problems(what: &str, problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{what} ({} problems):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

#[test]
fn reference_documents_exactly_the_crd_fields() {
    let schema = crd_schema(BUILD_CRD);
    let fields = schema_fields(&schema);
    assert!(
        fields.len() > 50,
        "only {} fields in the schema",
        fields.len()
    );
    let (builds, _) = reference_parts();
    assert_no_problems(
        &format!("{REFERENCE} (ImageBuild part) and {BUILD_CRD} disagree"),
        &part_problems(&builds, &schema, BUILD_CRD),
    );
}

#[test]
fn reference_documents_exactly_the_pipeline_crd_fields() {
    let (schema, template_spec) = pipeline_schema();
    let fields = schema_fields(&schema);
    assert!(
        fields.len() > 40,
        "only {} fields in the pipeline schema",
        fields.len()
    );
    // `spec.template.spec` is documented by the ImageBuild rows: only true while it
    // is the ImageBuild spec, with the same fields, types, defaults, bounds and rules.
    let build_spec = crd_schema(BUILD_CRD)["properties"]["spec"].clone();
    assert!(
        without_descriptions(&template_spec) == without_descriptions(&build_spec),
        "{PIPELINE_CRD}: spec.template.spec is no longer the ImageBuild spec of {BUILD_CRD}; \
         document its fields in the ImagePipeline part of {REFERENCE} and adapt this test"
    );
    let (_, pipelines) = reference_parts();
    assert_no_problems(
        &format!("{REFERENCE} (ImagePipeline part) and {PIPELINE_CRD} disagree"),
        &part_problems(&pipelines, &schema, PIPELINE_CRD),
    );
}

/// The check must be able to fail: a pipeline part without one of its rows, with a
/// row of the template's ImageBuild spec, or with a wrong default is refused.
#[test]
fn the_reference_check_refuses_a_missing_or_wrong_pipeline_row() {
    let (schema, _) = pipeline_schema();
    let (_, pipelines) = reference_parts();
    let edit = |f: &dyn Fn(&str) -> String| Part {
        kind: pipelines.kind,
        offset: pipelines.offset,
        text: pipelines.text.lines().map(f).collect::<Vec<_>>().join("\n"),
    };
    let missing = edit(&|l| {
        if l.starts_with("| `spec.imageRetention.keep` |") {
            String::new()
        } else {
            l.to_string()
        }
    });
    let problems = part_problems(&missing, &schema, PIPELINE_CRD);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("`spec.imageRetention.keep` is in")),
        "a missing row was not noticed: {problems:?}"
    );
    let extra = Part {
        text: format!(
            "{}\n| `spec.template.spec.onError` | string | default `cleanup` | … |",
            pipelines.text
        ),
        ..edit(&str::to_string)
    };
    let problems = part_problems(&extra, &schema, PIPELINE_CRD);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("`spec.template.spec.onError` in the ImagePipeline part")),
        "a row under spec.template.spec was not refused: {problems:?}"
    );
    let wrong = edit(&|l| l.replace("| default `Forbid` |", "| default `Replace` |"));
    let problems = part_problems(&wrong, &schema, PIPELINE_CRD);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("spec.concurrencyPolicy")),
        "a wrong default was not noticed: {problems:?}"
    );
}

#[test]
fn reference_has_an_example_of_each_builder_and_provisioner() {
    let (builds, _) = reference_parts();
    let examples: Vec<Value> = kiln_examples(yaml_docs(REFERENCE, &builds.text))
        .into_iter()
        .filter(|e| e.kind == "ImageBuild")
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
        ("shellLocal", has(&|p| p["shellLocal"]["inline"].is_array())),
        (
            "ansible from a ConfigMap",
            has(&|p| p["ansible"]["source"]["configMap"].is_object()),
        ),
        (
            "ansible from Git",
            has(&|p| p["ansible"]["source"]["git"].is_object()),
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

#[test]
fn reference_has_an_example_of_each_pipeline_trigger() {
    let (_, pipelines) = reference_parts();
    let examples: Vec<Value> = kiln_examples(yaml_docs(REFERENCE, &pipelines.text))
        .into_iter()
        .filter(|e| e.kind == "ImagePipeline")
        .map(|e| e.parsed.unwrap_or_else(|why| panic!("{}: {why}", e.at)))
        .collect();
    let any = |f: &dyn Fn(&Value) -> bool| examples.iter().any(|e| f(&e["spec"]));
    let wanted: Vec<(&str, bool)> = vec![
        (
            "schedule.cron with timeZone",
            any(&|s| s["schedule"]["cron"].is_string() && s["schedule"]["timeZone"].is_string()),
        ),
        (
            "schedule.every",
            any(&|s| s["schedule"]["every"].is_string()),
        ),
        ("onSourceChange", any(&|s| s["onSourceChange"].is_object())),
        ("imageRetention", any(&|s| s["imageRetention"].is_object())),
        (
            "outputConfigMap",
            any(&|s| s["outputConfigMap"].is_object()),
        ),
        (
            "template.metadata",
            any(&|s| s["template"]["metadata"].is_object()),
        ),
        (
            "a null-builder template",
            any(&|s| s["template"]["spec"]["builder"].get("null").is_some()),
        ),
    ];
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(w, _)| *w)
        .collect();
    assert!(
        missing.is_empty(),
        "{REFERENCE} has no complete ImagePipeline example of: {}",
        missing.join(", ")
    );
}

// ------------------------------------------------------- the controller's checks

/// Why the pipeline controller would refuse this ImagePipeline before building
/// (condition `Stalled`, reason `InvalidSpec`) where the schema accepts it.
fn controller_refusal(obj: &Value) -> Option<String> {
    let p: ImagePipeline = match serde_json::from_value(obj.clone()) {
        Ok(p) => p,
        Err(e) => return Some(format!("not an ImagePipeline: {e}")),
    };
    let name = p.metadata.name.clone().unwrap_or_default();
    if name.len() > 63 {
        return Some(format!("metadata.name {name:?}: more than 63 characters"));
    }
    let now = k8s_openapi::jiff::Timestamp::now();
    if let Err(e) = kiln::pipeline::decide::Timer::of(&p.spec, now) {
        return Some(e);
    }
    let template = &p.spec.template.spec;
    kiln::builders::admit(template, &kiln::builders::Policy::default())
        .and_then(|()| kiln::builders::plan(template).map(|_| ()))
        .and_then(|()| kiln::builders::repeatable(template))
        .err()
        .map(|e| format!("spec.template.{e}"))
}

#[test]
fn pipeline_examples_pass_the_controllers_own_checks() {
    let examples: Vec<Example> = all_examples()
        .into_iter()
        .filter(|e| e.kind == "ImagePipeline")
        .collect();
    assert!(
        examples.iter().any(|e| e.at.starts_with(REFERENCE))
            && examples.iter().any(|e| e.at.starts_with("README.md"))
            && examples.iter().any(|e| e.at.starts_with("examples/")),
        "ImagePipeline examples expected in {REFERENCE}, README.md and examples/: {:?}",
        examples.iter().map(|e| &e.at).collect::<Vec<_>>()
    );
    let mut problems = Vec::new();
    for ex in &examples {
        match &ex.parsed {
            Err(why) => problems.push(format!("{}: {why}", ex.at)),
            Ok(obj) => {
                if let Some(why) = controller_refusal(obj) {
                    problems.push(format!("{}: {why}", ex.at));
                }
            }
        }
    }
    // The check must be able to fail.
    let sample = examples
        .iter()
        .find_map(|e| {
            e.parsed
                .as_ref()
                .ok()
                .filter(|o| o["spec"]["template"]["spec"]["builder"]["amazonEBS"].is_object())
        })
        .expect("an amazonEBS ImagePipeline example");
    let mut same_name = sample.clone();
    same_name["spec"]["template"]["spec"]["builder"]["amazonEBS"]["amiName"] = json!("web");
    let mut every = sample.clone();
    every["spec"]["schedule"] = json!({"cron": "@every 1h"});
    let mut zone = sample.clone();
    zone["spec"]["schedule"] = json!({"cron": "0 3 * * *", "timeZone": "europe/berlin"});
    for (what, obj, says) in [
        ("the same AMI name for every build", same_name, "build.name"),
        ("@every", every, "@every"),
        ("a misspelt time zone", zone, "Europe/Berlin"),
    ] {
        let r = controller_refusal(&obj);
        assert!(
            r.as_ref().is_some_and(|r| r.contains(says)),
            "{what} must be refused: {r:?}"
        );
    }
    assert_no_problems(
        "ImagePipeline examples the controller would refuse (Stalled, InvalidSpec)",
        &problems,
    );
}

// --------------------------------------------------------------- apiserver

/// POST with `dryRun=All` and `fieldValidation=Strict`: nothing is stored, and an
/// unknown field is refused instead of pruned.
async fn dry_run_create(client: &Client, ns: &str, obj: &Value) -> Result<(), String> {
    let path = match obj["kind"].as_str() {
        Some("ImageBuild") => ImageBuild::url_path(&(), Some(ns)),
        Some("ImagePipeline") => ImagePipeline::url_path(&(), Some(ns)),
        other => return Err(format!("not a kiln kind: {other:?}")),
    };
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
                Ok(()) => accepted.push(format!("{} {}", ex.kind, ex.at)),
                Err(why) => problems.push(format!("{} {}: refused: {why}", ex.kind, ex.at)),
            },
        }
    }
    println!("examples accepted by the apiserver (dry run):");
    for at in &accepted {
        println!("  {at}");
    }
    for (kind, place) in [
        ("ImageBuild", REFERENCE),
        ("ImagePipeline", REFERENCE),
        ("ImagePipeline", "README.md"),
        ("ImagePipeline", "examples/pipeline.yaml"),
    ] {
        assert!(
            examples
                .iter()
                .any(|e| e.kind == kind && e.at.starts_with(place)),
            "no {kind} example found in {place}"
        );
    }

    // The check itself must be able to fail: a misspelt field, a missing required
    // one and a CEL rule are refused through the same path.
    let sample = |kind: &str| {
        examples
            .iter()
            .find(|e| e.kind == kind && e.at.starts_with(REFERENCE))
            .and_then(|e| e.parsed.as_ref().ok())
            .map(|o| in_namespace(o, &ns))
            .unwrap_or_else(|| panic!("{REFERENCE} has {kind} examples"))
    };
    let mut misspelt = sample("ImageBuild");
    misspelt["spec"]["onErorr"] = json!("keep");
    let mut incomplete = sample("ImageBuild");
    incomplete["spec"]["communicator"]["ssh"]
        .as_object_mut()
        .unwrap()
        .remove("hostKey");
    let mut misspelt_pipeline = sample("ImagePipeline");
    misspelt_pipeline["spec"]["concurrencyPolicey"] = json!("Forbid");
    let mut deleting_template = sample("ImagePipeline");
    deleting_template["spec"]["template"]["spec"]["artifactPolicy"] = json!("Delete");
    for (what, obj, says) in [
        ("an unknown field", misspelt, "onErorr"),
        ("a missing required field", incomplete, "hostKey"),
        (
            "an unknown field of an ImagePipeline",
            misspelt_pipeline,
            "concurrencyPolicey",
        ),
        (
            "a template whose artifactPolicy is Delete",
            deleting_template,
            "template.spec.artifactPolicy must be Retain",
        ),
    ] {
        let r = dry_run_create(&client, &ns, &obj).await;
        assert!(
            r.as_ref().is_err_and(|e| e.contains(says)),
            "{what} must be refused: {r:?}"
        );
    }

    let _ = nss.delete(&ns, &DeleteParams::default()).await;
    assert_no_problems(
        "examples in the docs and examples/ that the apiserver refuses",
        &problems,
    );
}
