//! The IAM policy in `docs/iam-policy.json` (and every full policy in `docs/iam.md`
//! that names an `ec2:` action) grants exactly the EC2 actions the amazon-ebs builder
//! calls: no more, no less.
//!
//! What the code calls is found statically: every method call `.name(` in
//! `src/builders/amazon/**/*.rs` (comments removed) whose name is an operation of
//! `aws_sdk_ec2::Client`. The operation list comes from the aws-sdk-ec2 source the
//! build uses (`src/client/<operation>.rs`, one file per operation, each with
//! `pub fn <operation>(&self) -> …::<Operation>FluentBuilder`), so the name of the IAM
//! action (`ec2:<Operation>`) is the SDK's own, not a guess from the snake case.
//! Matching on names rather than on `ec2.client.` keeps working however the client
//! is reached (a local binding, a helper, a paginator).
//! Tags given in a create call (`tag_specifications`) count as `ec2:CreateTags`,
//! which is how EC2 authorizes them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The version of aws-sdk-ec2 in Cargo.lock.
fn locked_sdk_version() -> String {
    let lock = std::fs::read_to_string(root().join("Cargo.lock")).expect("Cargo.lock");
    let mut lines = lock.lines();
    while let Some(l) = lines.next() {
        if l.trim() == r#"name = "aws-sdk-ec2""# {
            let v = lines.next().expect("version line after the name");
            return v
                .trim()
                .strip_prefix("version = \"")
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or_else(|| panic!("unexpected Cargo.lock line {v:?}"))
                .to_string();
        }
    }
    panic!("aws-sdk-ec2 is not in Cargo.lock");
}

/// `src/client` of the aws-sdk-ec2 crate the build uses: the cargo registry
/// (CARGO_HOME or ~/.cargo), else wherever `cargo metadata` says it is (vendored).
fn sdk_client_dir() -> PathBuf {
    let version = locked_sdk_version();
    let dir_name = format!("aws-sdk-ec2-{version}");
    let mut homes = Vec::new();
    if let Ok(h) = std::env::var("CARGO_HOME") {
        homes.push(PathBuf::from(h));
    }
    if let Ok(h) = std::env::var("HOME") {
        homes.push(Path::new(&h).join(".cargo"));
    }
    for home in homes {
        let Ok(indexes) = std::fs::read_dir(home.join("registry/src")) else {
            continue;
        };
        for index in indexes.flatten() {
            let dir = index.path().join(&dir_name).join("src/client");
            if dir.is_dir() {
                return dir;
            }
        }
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline"])
        .current_dir(root())
        .output()
        .expect("running cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata JSON");
    let manifest = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "aws-sdk-ec2" && p["version"] == version.as_str())
        .and_then(|p| p["manifest_path"].as_str())
        .unwrap_or_else(|| panic!("cargo metadata does not list aws-sdk-ec2 {version}"));
    let dir = Path::new(manifest).parent().unwrap().join("src/client");
    assert!(dir.is_dir(), "{} does not exist", dir.display());
    dir
}

/// `aws_sdk_ec2::Client` method name -> operation name (the IAM action without
/// `ec2:`), read from the SDK's generated client files.
fn sdk_operations() -> BTreeMap<String, String> {
    let dir = sdk_client_dir();
    let mut ops = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        // rustfmt may wrap long signatures: compare without whitespace.
        let flat: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let mut rest = flat.as_str();
        while let Some(i) = rest.find("pubfn") {
            rest = &rest[i + "pubfn".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let after = &rest[name.len()..];
            if !after.starts_with("(&self") {
                continue;
            }
            let Some(end) = after.find("FluentBuilder") else {
                continue;
            };
            let sig = &after[..end];
            let Some(start) = sig.rfind("::builders::") else {
                continue;
            };
            let op = &sig[start + "::builders::".len()..];
            if !op.is_empty() && op.chars().all(|c| c.is_ascii_alphanumeric()) {
                ops.insert(name, op.to_string());
            }
        }
    }
    assert!(
        ops.len() > 500,
        "found only {} operations in {}: the SDK layout changed?",
        ops.len(),
        dir.display()
    );
    ops
}

/// Rust source with comments replaced by spaces, and with the contents of string
/// literals too unless `keep_strings` (a `"//"` in a string is never a comment).
/// Newlines are kept, so offsets still map to the original lines.
fn strip_comments(src: &str, keep_strings: bool) -> String {
    let blank = |bytes: &[u8], out: &mut Vec<u8>| {
        for x in bytes {
            out.push(if keep_strings || *x == b'\n' {
                *x
            } else {
                b' '
            });
        }
    };
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                out.push(b' ');
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(if b[i] == b'\n' { b'\n' } else { b' ' });
                    i += 1;
                }
            }
        } else if c == b'r'
            && matches!(b.get(i + 1), Some(b'"' | b'#'))
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'))
        {
            // Raw string r"…" / r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push(c);
                i += 1;
                continue;
            }
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            let body_start = j + 1;
            let end = b[body_start..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(b.len(), |p| body_start + p + close.len());
            out.extend_from_slice(&b[i..body_start]);
            let body_end = end.saturating_sub(close.len()).max(body_start);
            blank(&b[body_start..body_end], &mut out);
            out.extend_from_slice(&b[body_end..end]);
            i = end;
        } else if c == b'"' {
            out.push(c);
            i += 1;
            while i < b.len() {
                if b[i] == b'\\' && i + 1 < b.len() {
                    blank(&b[i..i + 2], &mut out);
                    i += 2;
                } else if b[i] == b'"' {
                    out.push(b'"');
                    i += 1;
                    break;
                } else {
                    blank(&b[i..i + 1], &mut out);
                    i += 1;
                }
            }
        } else if c == b'\'' && b.get(i + 2) == Some(&b'\'') {
            // A one-character literal such as '"'.
            out.extend_from_slice(&b[i..i + 3]);
            i += 3;
        } else if c == b'\'' && b.get(i + 1) == Some(&b'\\') {
            // An escaped character literal such as '\'' or '\n'.
            let end = b[i + 2..]
                .iter()
                .skip(1)
                .position(|x| *x == b'\'')
                .map_or(b.len(), |p| i + 3 + p + 1);
            out.extend_from_slice(&b[i..end]);
            i = end;
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8(out).expect("comment stripping keeps UTF-8")
}

fn rust_files(dir: &Path, into: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
    {
        let p = entry.path();
        if p.is_dir() {
            rust_files(&p, into);
        } else if p.extension().is_some_and(|e| e == "rs") {
            into.push(p);
        }
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset].matches('\n').count() + 1
}

/// Every `.ident(` method call in `text`, with its byte offset.
fn method_calls(text: &str) -> Vec<(String, usize)> {
    let b = text.as_bytes();
    let mut calls = Vec::new();
    for (i, _) in text.match_indices('.') {
        let mut j = i + 1;
        while j < b.len() && b[j].is_ascii_whitespace() {
            j += 1;
        }
        let start = j;
        while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
            j += 1;
        }
        if j == start || b[start].is_ascii_digit() {
            continue;
        }
        let name = &text[start..j];
        while j < b.len() && b[j].is_ascii_whitespace() {
            j += 1;
        }
        if b.get(j) == Some(&b'(') {
            calls.push((name.to_string(), start));
        }
    }
    calls
}

struct CodeScan {
    /// Operation name -> where it is called (`file:line`).
    operations: BTreeMap<String, Vec<String>>,
    /// Labels passed to `AwsError::from_sdk("…", …)`, with where.
    error_labels: Vec<(String, String)>,
}

fn scan_code(ops: &BTreeMap<String, String>) -> CodeScan {
    let dir = root().join("src/builders/amazon");
    let mut files = Vec::new();
    rust_files(&dir, &mut files);
    files.sort();
    assert!(!files.is_empty(), "no Rust files under {}", dir.display());
    let mut scan = CodeScan {
        operations: BTreeMap::new(),
        error_labels: Vec::new(),
    };
    let tagging = "CreateTags".to_string();
    for file in files {
        let raw = std::fs::read_to_string(&file).unwrap();
        let code = strip_comments(&raw, false);
        let with_strings = strip_comments(&raw, true);
        let rel = file.strip_prefix(root()).unwrap().display().to_string();
        for (name, at) in method_calls(&code) {
            // Tags given in a create call are authorized as `ec2:CreateTags`.
            let op = if name == "tag_specifications" || name == "set_tag_specifications" {
                Some(&tagging)
            } else {
                ops.get(&name)
            };
            if let Some(op) = op {
                scan.operations
                    .entry(op.clone())
                    .or_default()
                    .push(format!("{rel}:{}", line_of(&code, at)));
            }
        }
        for (at, _) in code.match_indices("from_sdk(") {
            let rest = with_strings[at + "from_sdk(".len()..].trim_start();
            if let Some(label) = rest
                .strip_prefix('"')
                .and_then(|r| r.split_once('"'))
                .map(|(l, _)| l)
            {
                scan.error_labels
                    .push((label.to_string(), format!("{rel}:{}", line_of(&code, at))));
            }
        }
    }
    scan
}

/// The actions an IAM policy document allows, or what is wrong with its shape.
fn policy_actions(policy: &Value, what: &str) -> Result<BTreeSet<String>, Vec<String>> {
    let mut problems = Vec::new();
    if policy["Version"] != "2012-10-17" {
        problems.push(format!(
            "{what}: Version must be \"2012-10-17\", found {}",
            policy["Version"]
        ));
    }
    let statements: Vec<&Value> = match &policy["Statement"] {
        Value::Array(a) => a.iter().collect(),
        s @ Value::Object(_) => vec![s],
        other => {
            problems.push(format!("{what}: Statement is {other}, not a list"));
            vec![]
        }
    };
    if statements.is_empty() {
        problems.push(format!("{what}: no statements"));
    }
    let mut actions = BTreeSet::new();
    for (i, s) in statements.iter().enumerate() {
        let sid = s["Sid"].as_str().map_or(format!("#{i}"), str::to_string);
        if s["Effect"] != "Allow" {
            problems.push(format!("{what}: statement {sid}: Effect must be Allow"));
        }
        for key in ["NotAction", "NotResource"] {
            if s.get(key).is_some() {
                problems.push(format!("{what}: statement {sid}: {key} is not minimal"));
            }
        }
        if s.get("Resource").is_none() {
            problems.push(format!("{what}: statement {sid}: no Resource"));
        }
        let list: Vec<&Value> = match &s["Action"] {
            Value::String(_) => vec![&s["Action"]],
            Value::Array(a) => a.iter().collect(),
            other => {
                problems.push(format!("{what}: statement {sid}: Action is {other}"));
                vec![]
            }
        };
        for a in list {
            let Some(a) = a.as_str() else {
                problems.push(format!(
                    "{what}: statement {sid}: action {a} is not a string"
                ));
                continue;
            };
            if a.contains(['*', '?']) {
                problems.push(format!(
                    "{what}: statement {sid}: wildcard action {a}: list the actions"
                ));
            }
            actions.insert(a.to_string());
        }
    }
    if problems.is_empty() {
        Ok(actions)
    } else {
        Err(problems)
    }
}

/// Compares a policy's actions with the operations the code calls.
fn compare(
    what: &str,
    policy: &Value,
    code: &BTreeMap<String, Vec<String>>,
    problems: &mut Vec<String>,
) {
    let actions = match policy_actions(policy, what) {
        Ok(a) => a,
        Err(p) => {
            problems.extend(p);
            return;
        }
    };
    for (op, wheres) in code {
        let action = format!("ec2:{op}");
        if !actions.contains(&action) {
            problems.push(format!(
                "{what}: missing {action}, called at {}",
                wheres.join(", ")
            ));
        }
    }
    for a in &actions {
        let called = a
            .strip_prefix("ec2:")
            .is_some_and(|op| code.contains_key(op));
        if !called {
            problems.push(format!(
                "{what}: extra {a}: src/builders/amazon does not call it"
            ));
        }
    }
}

/// The ```json blocks of a Markdown file, with their first line.
fn json_blocks(text: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        match &mut current {
            None if t == "```json" => current = Some((n + 2, String::new())),
            Some(_) if t == "```" => blocks.push(current.take().unwrap()),
            Some((_, body)) => {
                body.push_str(line);
                body.push('\n');
            }
            None => {}
        }
    }
    blocks
}

#[test]
fn the_policy_grants_exactly_the_ec2_actions_the_code_calls() {
    let ops = sdk_operations();
    let scan = scan_code(&ops);
    assert!(
        scan.operations.len() >= 5 && scan.operations.contains_key("RunInstances"),
        "the scan of src/builders/amazon found too few EC2 calls ({:?}); the scan is broken",
        scan.operations.keys().collect::<Vec<_>>()
    );
    println!("EC2 actions the amazon-ebs builder calls:");
    for (op, wheres) in &scan.operations {
        println!("  ec2:{op:<32} {}", wheres.join(", "));
    }

    let mut problems = Vec::new();
    let path = root().join("docs/iam-policy.json");
    let text = std::fs::read_to_string(&path).expect("docs/iam-policy.json");
    let policy: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("docs/iam-policy.json is not valid JSON: {e}"));
    compare(
        "docs/iam-policy.json",
        &policy,
        &scan.operations,
        &mut problems,
    );

    // Every statement of the policy is explained in iam.md (by its Sid).
    let md = std::fs::read_to_string(root().join("docs/iam.md")).expect("docs/iam.md");
    for s in policy["Statement"].as_array().into_iter().flatten() {
        match s["Sid"].as_str() {
            Some(sid) if md.contains(&format!("`{sid}`")) => {}
            Some(sid) => problems.push(format!(
                "docs/iam-policy.json: statement {sid} is not explained in docs/iam.md"
            )),
            None => problems.push("docs/iam-policy.json: a statement has no Sid".into()),
        }
    }

    // Full policies shown in iam.md (blocks naming an ec2: action) must match too.
    let mut checked_md = 0;
    for (line, body) in json_blocks(&md) {
        if !body.contains("\"ec2:") {
            continue;
        }
        let what = format!("docs/iam.md:{line}");
        match serde_json::from_str::<Value>(&body) {
            Ok(v) => compare(&what, &v, &scan.operations, &mut problems),
            Err(e) => problems.push(format!("{what}: not valid JSON: {e}")),
        }
        checked_md += 1;
    }
    assert!(
        checked_md >= 1,
        "docs/iam.md shows no plain variant of the policy"
    );

    assert!(
        problems.is_empty(),
        "the IAM policy and the code disagree:\n  {}",
        problems.join("\n  ")
    );
}

/// Step failures read `ec2 <Action>: <Code>: …` and the docs tell users to grant
/// `ec2:<Action>`: every label must be an operation the code calls.
#[test]
fn error_labels_name_actions_the_code_calls() {
    let ops = sdk_operations();
    let scan = scan_code(&ops);
    assert!(
        !scan.error_labels.is_empty(),
        "no AwsError::from_sdk labels found; the scan is broken"
    );
    let wrong: Vec<String> = scan
        .error_labels
        .iter()
        .filter(|(label, _)| !scan.operations.contains_key(label))
        .map(|(label, at)| format!("{at}: {label:?}"))
        .collect();
    assert!(
        wrong.is_empty(),
        "error labels that are not EC2 operations called in src/builders/amazon:\n  {}",
        wrong.join("\n  ")
    );
}

#[test]
fn comment_stripping_and_call_detection() {
    let src = "let a = \"// not a comment .run_instances()\";\n\
               // ec2.client.terminate_instances()\n\
               /* ec2.client.stop_instances() */ let c = '\"';\n\
               ec2\n    .client\n    .describe_images ()\n";
    let code = strip_comments(src, false);
    let names: Vec<String> = method_calls(&code).into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"describe_images".to_string()), "{names:?}");
    assert!(!names.contains(&"run_instances".to_string()), "{names:?}");
    assert!(
        !names.contains(&"terminate_instances".to_string()),
        "{names:?}"
    );
    assert!(!names.contains(&"stop_instances".to_string()), "{names:?}");
    assert_eq!(code.len(), src.len());
    assert_eq!(code.lines().count(), src.lines().count());
    let kept = strip_comments(src, true);
    assert!(
        kept.contains("\"// not a comment .run_instances()\""),
        "{kept}"
    );
    assert!(!kept.contains("terminate_instances"), "{kept}");
}
