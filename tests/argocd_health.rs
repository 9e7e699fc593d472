//! The Argo CD health checks under a real Lua 5.1 interpreter (Argo CD's dialect):
//! config/argocd/health.lua against ImageBuild status fixtures in each phase, and
//! config/argocd/pipeline-health.lua against ImagePipeline status fixtures in each
//! state (the conditions as `src/pipeline/decide.rs` sets them).

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

const BUILD_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/argocd/health.lua");
const PIPELINE_SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/config/argocd/pipeline-health.lua"
);

/// Argo CD's verdict on an ImageBuild: (status, message).
fn health(obj: &Value) -> (String, String) {
    run(BUILD_SCRIPT, obj)
}

/// What a health script from `argocd-cm` may use: Argo CD runs it with the base,
/// table and (a safe) os library only, no string library (nor string methods), with
/// the object as the global `obj`, and takes the table it returns.
const ARGO_SANDBOX: &str = r#"
local chunk = assert(loadfile(SCRIPT))
local env = { obj = obj, table = table, os = { time = os.time, date = os.date, clock = os.clock, difftime = os.difftime } }
for _, k in ipairs({ "assert", "error", "ipairs", "next", "pairs", "pcall", "select", "tonumber",
  "tostring", "type", "unpack", "xpcall", "rawequal", "rawget", "rawset", "getmetatable",
  "setmetatable", "_VERSION" }) do
  env[k] = _G[k]
end
env._G = env
setfenv(chunk, env)
local write = io.write
debug.setmetatable("", nil)
local hs = chunk()
assert(type(hs) == "table", "the script returned " .. type(hs) .. ", not a table")
assert(type(hs.status) == "string", "status is not a string")
assert(hs.message == nil or type(hs.message) == "string", "message is not a string")
write(hs.status, "\n", hs.message or "")
"#;

/// Runs a health script with `obj` as Argo CD hands it over: (status, message).
fn run(script: &str, obj: &Value) -> (String, String) {
    let prog = format!(
        "obj = {}\nlocal SCRIPT = {script:?}\n{ARGO_SANDBOX}",
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
    assert!(
        [
            "Healthy",
            "Progressing",
            "Degraded",
            "Suspended",
            "Missing",
            "Unknown"
        ]
        .contains(&status),
        "{status:?} is not an Argo CD health status"
    );
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

fn pipeline(generation: i64, spec: Value, status: Option<Value>) -> Value {
    let mut o = json!({
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "ImagePipeline",
        "metadata": {"name": "web", "generation": generation},
        "spec": spec,
    });
    if let Some(s) = status {
        o["status"] = s;
    }
    o
}

/// One condition as `src/pipeline/decide.rs` writes it: (status, reason, message).
fn cond(type_: &str, generation: i64, (status, reason, message): (&str, &str, &str)) -> Value {
    json!({"type": type_, "status": status, "reason": reason, "message": message,
        "observedGeneration": generation, "lastTransitionTime": "2025-01-01T00:00:00Z"})
}

/// A pipeline status at `generation` with its Ready, Reconciling and Stalled
/// conditions, `status.message`, and `latestVersion` when one exists.
fn pipeline_status(
    generation: i64,
    ready: (&str, &str, &str),
    reconciling: (&str, &str, &str),
    stalled: (&str, &str, &str),
    message: &str,
    latest: Option<i64>,
) -> Value {
    let mut s = json!({
        "observedGeneration": generation,
        "conditions": [
            cond("Ready", generation, ready),
            cond("Reconciling", generation, reconciling),
            cond("Stalled", generation, stalled),
        ],
        "message": message,
        "sequence": latest.unwrap_or(1),
        "consecutiveFailures": 0,
    });
    if let Some(v) = latest {
        s["latestVersion"] = json!(v);
        s["latest"] = json!([{"region": "us-east-1", "imageId": "ami-0123"}]);
    }
    s
}

const IDLE: (&str, &str, &str) = ("False", "Idle", "no build of a new template is running");
const TRIGGERING: (&str, &str, &str) = (
    "False",
    "Triggering",
    "the pipeline starts builds when a trigger fires",
);
const BRAKE: &str = "2 builds failed in a row (maxConsecutiveFailures: 2); change the spec or the annotation kiln.dev/resume to resume";
const INVALID: &str = "spec.schedule.cron: invalid cron expression \"0 3 * *\"";
const PINNED: &str =
    "spec.pinnedVersion: 7 is not a version of this pipeline with images (versions: 2, 3)";

#[test]
fn pipeline_health_follows_the_conditions_the_generation_and_suspend() {
    let every = json!({"schedule": {"every": "6h"}});
    let suspended = json!({"schedule": {"every": "6h"}, "suspend": true});
    let v1 = ("True", "VersionAvailable", "version 1 is the latest");
    let v3 = ("True", "VersionAvailable", "version 3 is the latest");
    let first = (
        "True",
        "Building",
        "ImageBuild web-1 builds the current template",
    );
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "no status yet",
            pipeline(1, every.clone(), None),
            "Progressing",
            "not reported",
        ),
        (
            "first build running",
            pipeline(
                1,
                every.clone(),
                Some(pipeline_status(
                    1,
                    ("False", "Building", "ImageBuild web-1 is running"),
                    first,
                    TRIGGERING,
                    "ImageBuild web-1 is running (template)",
                    None,
                )),
            ),
            "Progressing",
            "web-1 builds the current template",
        ),
        (
            "version 1 available",
            pipeline(
                1,
                every.clone(),
                Some(pipeline_status(
                    1,
                    v1,
                    IDLE,
                    TRIGGERING,
                    "version 1 is the latest",
                    Some(1),
                )),
            ),
            "Healthy",
            "version 1 is the latest",
        ),
        (
            "a scheduled rebuild of the same template running",
            pipeline(
                1,
                every.clone(),
                Some(pipeline_status(
                    1,
                    v1,
                    IDLE,
                    TRIGGERING,
                    "ImageBuild web-2 is running (schedule)",
                    Some(1),
                )),
            ),
            "Healthy",
            "version 1 is the latest; ImageBuild web-2 is running (schedule)",
        ),
        (
            "template changed, kiln has not seen it yet",
            pipeline(
                2,
                every.clone(),
                Some(pipeline_status(
                    1,
                    v1,
                    IDLE,
                    TRIGGERING,
                    "version 1 is the latest",
                    Some(1),
                )),
            ),
            "Progressing",
            "generation 2",
        ),
        (
            "the changed template building",
            pipeline(
                2,
                every.clone(),
                Some(pipeline_status(
                    2,
                    v1,
                    (
                        "True",
                        "Building",
                        "ImageBuild web-2 builds the current template",
                    ),
                    TRIGGERING,
                    "ImageBuild web-2 is running (template)",
                    Some(1),
                )),
            ),
            "Progressing",
            "web-2 builds the current template",
        ),
        (
            "conditions of an older generation",
            pipeline(2, every.clone(), {
                let mut s =
                    pipeline_status(1, v1, IDLE, TRIGGERING, "version 1 is the latest", Some(1));
                s["observedGeneration"] = json!(2);
                Some(s)
            }),
            "Progressing",
            "",
        ),
        (
            "the failure brake",
            pipeline(
                3,
                every.clone(),
                Some(pipeline_status(
                    3,
                    ("False", "FailureBrake", BRAKE),
                    IDLE,
                    ("True", "FailureBrake", BRAKE),
                    BRAKE,
                    Some(1),
                )),
            ),
            "Degraded",
            BRAKE,
        ),
        (
            "the brake of an older generation (the spec change re-arms it)",
            pipeline(
                4,
                every.clone(),
                Some(pipeline_status(
                    3,
                    ("False", "FailureBrake", BRAKE),
                    IDLE,
                    ("True", "FailureBrake", BRAKE),
                    BRAKE,
                    Some(1),
                )),
            ),
            "Progressing",
            "generation 4",
        ),
        (
            "an invalid spec",
            pipeline(
                1,
                json!({"schedule": {"cron": "0 3 * *"}}),
                Some(pipeline_status(
                    1,
                    ("False", "InvalidSpec", INVALID),
                    IDLE,
                    ("True", "InvalidSpec", INVALID),
                    INVALID,
                    None,
                )),
            ),
            "Degraded",
            INVALID,
        ),
        (
            "a pinned version that does not exist",
            pipeline(
                5,
                json!({"pinnedVersion": 7}),
                Some(pipeline_status(
                    5,
                    ("False", "PinnedVersionUnknown", PINNED),
                    IDLE,
                    ("True", "PinnedVersionUnknown", PINNED),
                    PINNED,
                    Some(3),
                )),
            ),
            "Degraded",
            PINNED,
        ),
        (
            "the first build failed; waiting for the next trigger",
            pipeline(
                1,
                every.clone(),
                Some(pipeline_status(
                    1,
                    ("False", "NoVersion", "no build has succeeded yet"),
                    IDLE,
                    TRIGGERING,
                    "no build has succeeded yet",
                    None,
                )),
            ),
            "Progressing",
            "no build has succeeded yet",
        ),
        (
            "suspended with a version",
            pipeline(
                2,
                suspended.clone(),
                Some(pipeline_status(
                    2,
                    v3,
                    IDLE,
                    TRIGGERING,
                    "suspended",
                    Some(3),
                )),
            ),
            "Suspended",
            "suspended (spec.suspend): no new builds start; version 3 is the latest",
        ),
        (
            "suspended before its first version",
            pipeline(
                1,
                suspended.clone(),
                Some(pipeline_status(
                    1,
                    ("False", "Suspended", "suspended before its first version"),
                    IDLE,
                    TRIGGERING,
                    "suspended",
                    None,
                )),
            ),
            "Suspended",
            "suspended (spec.suspend): no new builds start",
        ),
        (
            "suspended while the first build (started before) runs on",
            pipeline(
                2,
                suspended.clone(),
                Some(pipeline_status(
                    2,
                    ("False", "Building", "ImageBuild web-1 is running"),
                    first,
                    TRIGGERING,
                    "ImageBuild web-1 is running (template)",
                    None,
                )),
            ),
            "Suspended",
            "suspended (spec.suspend): no new builds start; ImageBuild web-1 is running (template)",
        ),
        (
            "suspended, kiln has not seen it yet",
            pipeline(
                2,
                suspended.clone(),
                Some(pipeline_status(
                    1,
                    v1,
                    IDLE,
                    TRIGGERING,
                    "version 1 is the latest",
                    Some(1),
                )),
            ),
            "Progressing",
            "generation 2",
        ),
        (
            "suspended with an invalid spec",
            pipeline(
                2,
                json!({"schedule": {"cron": "0 3 * *"}, "suspend": true}),
                Some(pipeline_status(
                    2,
                    ("False", "InvalidSpec", INVALID),
                    IDLE,
                    ("True", "InvalidSpec", INVALID),
                    INVALID,
                    Some(1),
                )),
            ),
            "Degraded",
            INVALID,
        ),
        (
            "suspend: false",
            pipeline(
                3,
                json!({"suspend": false}),
                Some(pipeline_status(
                    3,
                    v3,
                    IDLE,
                    TRIGGERING,
                    "version 3 is the latest",
                    Some(3),
                )),
            ),
            "Healthy",
            "version 3 is the latest",
        ),
    ];
    for (what, obj, want, message) in cases {
        let (got, got_message) = run(PIPELINE_SCRIPT, &obj);
        assert_eq!(got, want, "{what}: message {got_message:?}");
        assert!(
            got_message.contains(message),
            "{what}: message {got_message:?} lacks {message:?}"
        );
    }
}

/// The script written for ImagePipeline says nothing of an ImageBuild's phases and
/// the ImageBuild script nothing of a pipeline's suspend: each kind has its own key.
#[test]
fn each_kind_has_its_own_script() {
    let suspended_pipeline = pipeline(
        1,
        json!({"suspend": true}),
        Some(pipeline_status(
            1,
            ("True", "VersionAvailable", "version 1 is the latest"),
            IDLE,
            TRIGGERING,
            "suspended",
            Some(1),
        )),
    );
    assert_eq!(run(PIPELINE_SCRIPT, &suspended_pipeline).0, "Suspended");
    for script in [BUILD_SCRIPT, PIPELINE_SCRIPT] {
        let text = std::fs::read_to_string(script).unwrap();
        let first = text.lines().next().unwrap_or_default();
        let kind = if script == BUILD_SCRIPT {
            "ImageBuild"
        } else {
            "ImagePipeline"
        };
        assert!(
            first.contains(&format!("resource.customizations.health.kiln.dev_{kind})")),
            "{script}: the first line names the argocd-cm key: {first}"
        );
    }
}
