//! config/argocd/health.lua under a real Lua 5.1 interpreter (Argo CD's dialect),
//! against ImageBuild status fixtures in each phase.

use std::process::Command;

use serde_json::{Value, json};

/// A JSON value as a Lua table constructor, the shape Argo CD hands the script.
fn lua(v: &Value) -> String {
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Array(a) => format!("{{{}}}", a.iter().map(lua).collect::<Vec<_>>().join(", ")),
        Value::Object(o) => format!(
            "{{{}}}",
            o.iter()
                .map(|(k, v)| format!("[{k:?}] = {}", lua(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn health(obj: &Value) -> (String, String) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/config/argocd/health.lua");
    let prog = format!(
        "obj = {}\nlocal hs = dofile({script:?})\nio.write(hs.status, \"\\n\", hs.message or \"\")",
        lua(obj)
    );
    let out = Command::new("lua5.1")
        .args(["-e", &prog])
        .output()
        .expect("lua5.1 (installed by tests/env/up.sh)");
    assert!(
        out.status.success(),
        "lua failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (status, message) = text.split_once('\n').unwrap_or((&text, ""));
    (status.to_string(), message.to_string())
}

fn build(generation: i64, status: Option<Value>) -> Value {
    let mut o = json!({
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "ImageBuild",
        "metadata": {"name": "web", "generation": generation},
        "spec": {},
    });
    if let Some(s) = status {
        o["status"] = s;
    }
    o
}

fn conds(generation: i64, ready: &str, reconciling: &str, stalled: &str, msg: &str) -> Value {
    json!([
        {"type": "Ready", "status": ready, "observedGeneration": generation, "reason": "x", "message": msg},
        {"type": "Reconciling", "status": reconciling, "observedGeneration": generation, "reason": "x", "message": msg},
        {"type": "Stalled", "status": stalled, "observedGeneration": generation, "reason": "x", "message": msg},
    ])
}

#[test]
fn health_follows_the_conditions_and_the_generation() {
    let cases = [
        ("no status yet", build(1, None), "Missing"),
        (
            "running",
            build(
                1,
                Some(
                    json!({"observedGeneration": 1, "phase": "Running", "message": "building generation 1",
                "conditions": conds(1, "False", "True", "False", "building generation 1")}),
                ),
            ),
            "Progressing",
        ),
        (
            "cleaning up",
            build(
                1,
                Some(json!({"observedGeneration": 1, "phase": "CleaningUp",
                "conditions": conds(1, "False", "True", "False", "")})),
            ),
            "Progressing",
        ),
        (
            "succeeded",
            build(
                1,
                Some(
                    json!({"observedGeneration": 1, "phase": "Succeeded", "message": "generation 1 built",
                "conditions": conds(1, "True", "False", "False", "generation 1 built")}),
                ),
            ),
            "Healthy",
        ),
        (
            "succeeded for an older generation",
            build(
                2,
                Some(json!({"observedGeneration": 1, "phase": "Succeeded",
                "conditions": conds(1, "True", "False", "False", "generation 1 built")})),
            ),
            "Progressing",
        ),
        (
            "failed",
            build(
                1,
                Some(
                    json!({"observedGeneration": 1, "phase": "Failed", "message": "step shell-1 failed: script exited with code 3",
                "conditions": conds(1, "False", "False", "True", "step shell-1 failed: script exited with code 3")}),
                ),
            ),
            "Degraded",
        ),
        (
            "failed, then the spec changed",
            build(
                3,
                Some(json!({"observedGeneration": 2, "phase": "Failed",
                "conditions": conds(2, "False", "False", "True", "old failure")})),
            ),
            "Progressing",
        ),
    ];
    for (what, obj, want) in cases {
        let (got, message) = health(&obj);
        assert_eq!(got, want, "{what}: message {message:?}");
        if want == "Degraded" {
            // Argo CD shows why: the Stalled condition's message.
            assert!(message.contains("exited with code 3"), "{what}: {message}");
        }
    }
}
