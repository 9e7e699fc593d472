//! The two ways to install kiln: the Helm chart (`charts/kiln`) and the plain
//! manifests (`config/`, kustomize). Linted and rendered with the `helm` and `kubectl`
//! that `tests/env/up.sh` builds, and applied for real (server-side apply, not a dry
//! run) to the test kube-apiserver, whose RBAC authorizer then answers what the
//! operator's ServiceAccount may and may not do.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{TestEnv, repo_root, short_id};
use serde_json::{Value, json};

const CRD: &str = "imagebuilds.kiln.dev";
const PIPELINE_CRD: &str = "imagepipelines.kiln.dev";

struct Tools {
    kubectl: PathBuf,
    helm: PathBuf,
    kubeconfig: PathBuf,
    /// HELM_*_HOME: helm writes nothing outside the state dir.
    helm_home: PathBuf,
}

/// kubectl and helm: `<state>/bin` (where up.sh links them, first on env.sh's PATH),
/// else the first on PATH.
fn tools() -> &'static Tools {
    static TOOLS: OnceLock<Tools> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let env = TestEnv::load();
        let find = |name: &str| {
            let mut dirs = vec![env.dir.join("bin")];
            dirs.extend(std::env::split_paths(
                &std::env::var_os("PATH").unwrap_or_default(),
            ));
            dirs.into_iter()
                .map(|d| d.join(name))
                .find(|p| p.is_file())
                .unwrap_or_else(|| {
                    panic!(
                        "`{name}` is neither in {} nor on PATH: `bash tests/env/up.sh` builds it \
                         (and `. .kiln-test-env/env.sh` puts it on PATH)",
                        env.dir.join("bin").display()
                    )
                })
        };
        let t = Tools {
            kubectl: find("kubectl"),
            helm: find("helm"),
            kubeconfig: env.kubeconfig.clone(),
            helm_home: env.dir.join("helm"),
        };
        eprintln!(
            "kubectl: {}, helm: {}",
            t.kubectl.display(),
            t.helm.display()
        );
        t
    })
}

fn exec(program: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let t = tools();
    common::run_tool(program, &t.kubeconfig, &t.helm_home, args, stdin)
}

fn describe(program: &Path, args: &[&str], out: &Output) -> String {
    format!(
        "`{} {}` exited with {}\nstdout:\n{}\nstderr:\n{}",
        program.file_name().unwrap_or_default().to_string_lossy(),
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs the command, panicking with its output unless it succeeds; returns stdout.
fn ok(program: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let out = exec(program, args, stdin);
    assert!(out.status.success(), "{}", describe(program, args, &out));
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn helm(args: &[&str]) -> String {
    ok(&tools().helm, args, None)
}

fn kubectl(args: &[&str], stdin: Option<&str>) -> String {
    ok(&tools().kubectl, args, stdin)
}

/// Every object in a multi-document YAML stream.
fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(d).expect("YAML document");
            serde_json::to_value(v).expect("YAML as JSON")
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} among {:?}", ids(objs)))
}

fn ids(objs: &[Value]) -> Vec<String> {
    objs.iter()
        .map(|o| {
            let ns = o["metadata"]["namespace"].as_str().unwrap_or("");
            format!(
                "{}/{}/{}",
                o["kind"].as_str().unwrap_or("?"),
                ns,
                o["metadata"]["name"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

fn env_of(container: &Value) -> BTreeMap<String, Value> {
    container["env"]
        .as_array()
        .expect("container env")
        .iter()
        .map(|e| (e["name"].as_str().expect("env name").to_string(), e.clone()))
        .collect()
}

/// A scratch file for values, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> TempFile {
        let path = std::env::temp_dir().join(format!("kiln-packaging-{}-{name}", short_id()));
        std::fs::write(&path, text).expect("writing a values file");
        TempFile(path)
    }
    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Values that switch on what the defaults leave off.
const FEATURE_VALUES: &str = r#"
watchNamespaces: [team-a, team-b]
aws:
  credentials: {mode: irsa}
  irsa: {roleArn: "arn:aws:iam::123456789012:role/kiln"}
serviceMonitor:
  enabled: true
  interval: 1m
  labels: {release: prometheus}
"#;

// ----------------------------------------------------------------------------- lint

#[test]
fn chart_lints_and_rejects_bad_values() {
    let out = helm(&["lint", "--strict", "charts/kiln"]);
    assert!(out.contains("0 chart(s) failed"), "{out}");
    let features = TempFile::new("features.yaml", FEATURE_VALUES);
    let out = helm(&["lint", "--strict", "charts/kiln", "-f", features.path()]);
    assert!(out.contains("0 chart(s) failed"), "{out}");

    // What the feature values render to.
    let objs = docs(&helm(&[
        "template",
        "rel",
        "charts/kiln",
        "-n",
        "ops",
        "-f",
        features.path(),
    ]));
    let sa = find(&objs, "ServiceAccount", "rel-kiln");
    assert_eq!(
        sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
        "arn:aws:iam::123456789012:role/kiln"
    );
    assert!(
        !objs.iter().any(|o| o["kind"] == "ClusterRoleBinding"),
        "watchNamespaces set, yet a ClusterRoleBinding: {:?}",
        ids(&objs)
    );
    let bound: BTreeSet<&str> = objs
        .iter()
        .filter(|o| o["kind"] == "RoleBinding" && o["roleRef"]["kind"] == "ClusterRole")
        .map(|o| o["metadata"]["namespace"].as_str().expect("namespace"))
        .collect();
    assert_eq!(bound, BTreeSet::from(["team-a", "team-b"]));
    let deploy = find(&objs, "Deployment", "rel-kiln");
    let env = env_of(&deploy["spec"]["template"]["spec"]["containers"][0]);
    assert_eq!(env["KILN_NAMESPACE"]["value"], "team-a,team-b");
    assert_eq!(env["KILN_LEASE_NAME"]["value"], "rel-kiln-leader");
    assert_eq!(env["KILN_LEADER_ELECTION_NAMESPACE"]["value"], "ops");
    assert!(
        !env.contains_key("AWS_ACCESS_KEY_ID"),
        "irsa mode, yet key env: {env:?}"
    );
    let monitor = find(&objs, "ServiceMonitor", "rel-kiln");
    let service = find(&objs, "Service", "rel-kiln-metrics");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(
        monitor["spec"]["endpoints"][0]["port"],
        service["spec"]["ports"][0]["name"]
    );
    assert_eq!(monitor["spec"]["endpoints"][0]["interval"], "1m");
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels")
    {
        assert_eq!(
            &service["metadata"]["labels"][k], v,
            "the ServiceMonitor does not select the Service on {k}"
        );
    }

    // Secret mode, with key names of one's own.
    let objs = docs(&helm(&[
        "template",
        "kiln",
        "charts/kiln",
        "--set",
        "aws.credentials.mode=secret,aws.secret.name=aws,aws.secret.accessKeyIdKey=id,aws.region=eu-west-1",
    ]));
    let env =
        env_of(&find(&objs, "Deployment", "kiln")["spec"]["template"]["spec"]["containers"][0]);
    assert_eq!(
        env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"],
        json!({"name": "aws", "key": "id"})
    );
    assert_eq!(
        env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"],
        json!({"name": "aws", "key": "AWS_SECRET_ACCESS_KEY"})
    );
    assert_eq!(
        env["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"],
        json!({"name": "aws", "key": "AWS_SESSION_TOKEN", "optional": true})
    );
    assert_eq!(env["AWS_REGION"]["value"], "eu-west-1");

    // Bad values fail, naming the value: through values.schema.json, and through the
    // templates' own checks when the schema is skipped. Each has a good twin that
    // renders, so that the failure is the value's and nothing else's.
    let cases: &[(&str, &str, &str, &str)] = &[
        // (bad --set, good --set, schema error names, template error names)
        (
            "log.format=xml",
            "log.format=text",
            "/log/format",
            "log.format",
        ),
        (
            "aws.credentials.mode=irsa",
            "aws.credentials.mode=irsa,aws.irsa.roleArn=arn:aws:iam::123456789012:role/k",
            "/aws/irsa/roleArn",
            "aws.irsa.roleArn",
        ),
        (
            "aws.credentials.mode=secret",
            "aws.credentials.mode=secret,aws.secret.name=aws",
            "/aws/secret/name",
            "aws.secret.name",
        ),
        (
            "aws.credentials.mode=vault",
            "aws.credentials.mode=none",
            "/aws/credentials/mode",
            "aws.credentials.mode",
        ),
        (
            "watchNamespaces={a,}",
            "watchNamespaces={a}",
            "/watchNamespaces/1",
            "watchNamespaces",
        ),
    ];
    let helm_bin = &tools().helm;
    for &(bad, good, schema_names, template_names) in cases {
        helm(&["template", "kiln", "charts/kiln", "--set", good]);
        for (skip, names) in [(false, schema_names), (true, template_names)] {
            let mut args = vec!["template", "kiln", "charts/kiln", "--set", bad];
            if skip {
                args.push("--skip-schema-validation");
            }
            let out = exec(helm_bin, &args, None);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && stderr.contains(names),
                "want a failure naming {names:?}; {}",
                describe(helm_bin, &args, &out)
            );
        }
    }
    // A key the chart does not have (here: the old singular watchNamespace).
    let args = [
        "template",
        "kiln",
        "charts/kiln",
        "--set",
        "watchNamespace=a",
    ];
    let out = exec(helm_bin, &args, None);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("watchNamespace"),
        "{}",
        describe(helm_bin, &args, &out)
    );
}

// -------------------------------------------------------------------- RBAC checks

/// Asks the apiserver's authorizer (`kubectl auth can-i`, impersonating the
/// ServiceAccount with its groups) each "VERB RESOURCE [FLAGS]" and compares the
/// answers with `want`. Grants are retried for a few seconds: the authorizer's cache
/// sees new bindings a moment after they are created.
fn check_access(sa_namespace: &str, sa: &str, want: &[(&str, bool)]) {
    let user = format!("--as=system:serviceaccount:{sa_namespace}:{sa}");
    let group = format!("--as-group=system:serviceaccounts:{sa_namespace}");
    let ask = |question: &str| -> bool {
        let mut args = vec!["auth", "can-i"];
        args.extend(question.split_whitespace());
        args.extend([
            user.as_str(),
            "--as-group=system:serviceaccounts",
            group.as_str(),
            "--as-group=system:authenticated",
        ]);
        let kubectl = &tools().kubectl;
        let out = exec(kubectl, &args, None);
        match String::from_utf8_lossy(&out.stdout).trim() {
            s if s.starts_with("yes") => true,
            s if s.starts_with("no") => false,
            _ => panic!("{}", describe(kubectl, &args, &out)),
        }
    };
    let mut wrong = Vec::new();
    for &(question, _) in want.iter().filter(|(_, w)| *w) {
        let start = Instant::now();
        while !ask(question) {
            if start.elapsed() > Duration::from_secs(15) {
                wrong.push(format!("{sa} may not {question}, but should"));
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    for &(question, _) in want.iter().filter(|(_, w)| !*w) {
        if ask(question) {
            wrong.push(format!("{sa} may {question}, but should not"));
        }
    }
    assert!(wrong.is_empty(), "RBAC:\n{}", wrong.join("\n"));
}

fn wait_crd_established() {
    kubectl(
        &[
            "wait",
            "--for=condition=Established",
            &format!("crd/{CRD}"),
            "--timeout=60s",
        ],
        None,
    );
}

/// Server-side apply (strict field validation) of `-f -` with `stdin`, or of `-k DIR`.
fn apply(source: &[&str], stdin: Option<&str>) {
    let mut args = vec![
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=kiln-packaging-test",
    ];
    args.extend(source);
    kubectl(&args, stdin);
}

/// `kubectl get` of every object in `manifest`: fails unless all exist.
fn get_all(manifest: &str) -> Vec<Value> {
    let list: Value =
        serde_json::from_str(&kubectl(&["get", "-f", "-", "-o", "json"], Some(manifest)))
            .expect("JSON");
    list["items"].as_array().expect("items").clone()
}

fn sorted_ids(objs: &[Value]) -> Vec<String> {
    let mut ids = ids(objs);
    ids.sort();
    ids
}

// ------------------------------------------------------------------- chart install

/// The Prometheus Operator's ServiceMonitor CRD, cut down to the fields the chart
/// sets (names, types and duration patterns as in monitoring.coreos.com/v1). The test
/// apiserver has no such CRD and the real one is not vendored here; with this subset
/// the chart's ServiceMonitor is stored for real, and since the schema does not
/// preserve unknown fields, server-side apply (strict field validation) rejects a
/// misspelt or misplaced field. It stays installed: nothing else uses the group, and
/// another test process may be applying it at the same time.
const SERVICE_MONITOR_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: servicemonitors.monitoring.coreos.com
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {kind: ServiceMonitor, listKind: ServiceMonitorList, plural: servicemonitors, singular: servicemonitor}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        required: [spec]
        properties:
          apiVersion: {type: string}
          kind: {type: string}
          metadata: {type: object}
          spec:
            type: object
            required: [selector]
            properties:
              jobLabel: {type: string}
              selector:
                type: object
                x-kubernetes-map-type: atomic
                properties:
                  matchLabels: {type: object, additionalProperties: {type: string}}
                  matchExpressions:
                    type: array
                    items:
                      type: object
                      required: [key, operator]
                      properties:
                        key: {type: string}
                        operator: {type: string}
                        values: {type: array, items: {type: string}}
              namespaceSelector:
                type: object
                properties:
                  any: {type: boolean}
                  matchNames: {type: array, items: {type: string}}
              endpoints:
                type: array
                items:
                  type: object
                  properties:
                    port: {type: string}
                    path: {type: string}
                    scheme: {type: string, enum: [http, https]}
                    interval: {type: string, pattern: '^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$'}
                    scrapeTimeout: {type: string, pattern: '^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$'}
"#;

/// Deletes what a test created on the apiserver, also when it fails: its namespaces
/// (with everything in them) and its releases' cluster-scoped objects. Never the
/// ImageBuild CRD, which other tests use.
struct Cleanup {
    namespaces: Vec<String>,
    releases: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let kubectl = &tools().kubectl;
        let selector = format!(
            "app.kubernetes.io/instance in ({})",
            self.releases.join(",")
        );
        let mut runs = vec![vec![
            "delete".to_string(),
            "clusterrole,clusterrolebinding".into(),
            "-l".into(),
            selector,
            "--ignore-not-found".into(),
        ]];
        runs.push(
            ["delete", "namespace", "--ignore-not-found", "--wait=false"]
                .iter()
                .map(|s| s.to_string())
                .chain(self.namespaces.iter().cloned())
                .collect(),
        );
        for args in runs {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = exec(kubectl, &args, None);
            if !out.status.success() {
                eprintln!("cleanup: {}", describe(kubectl, &args, &out));
            }
        }
    }
}

#[test]
fn chart_installs_on_the_apiserver() {
    let id = short_id();
    // Release `full`: every feature on, watching two namespaces of its own. Release
    // `plain`: the default values (a ClusterRoleBinding, all namespaces).
    let full = format!("pkg-{id}");
    let plain = format!("pkgd-{id}");
    let ns = format!("kiln-pkg-{id}");
    let ns_plain = format!("kiln-pkgd-{id}");
    let (team_a, team_b) = (format!("kiln-pkg-{id}-a"), format!("kiln-pkg-{id}-b"));
    let namespaces = [&ns, &ns_plain, &team_a, &team_b];
    let _cleanup = Cleanup {
        namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
        releases: vec![full.clone(), plain.clone()],
    };
    for n in namespaces {
        kubectl(&["create", "namespace", n], None);
    }
    apply(&["-f", "-"], Some(SERVICE_MONITOR_CRD));
    kubectl(
        &[
            "wait",
            "--for=condition=Established",
            "crd/servicemonitors.monitoring.coreos.com",
            "--timeout=60s",
        ],
        None,
    );

    let values = TempFile::new(
        "install.yaml",
        &format!(
            r#"
replicaCount: 2
watchNamespaces: [{team_a}, {team_b}]
log: {{level: "info,kiln=debug", format: text}}
aws:
  region: us-east-2
  credentials: {{mode: irsa}}
  irsa: {{roleArn: "arn:aws:iam::123456789012:role/kiln-builder"}}
resources:
  requests: {{cpu: 123m, memory: 77Mi}}
  limits: {{cpu: "1", memory: 333Mi}}
serviceMonitor: {{enabled: true, interval: 45s}}
podLabels: {{team: images}}
"#
        ),
    );
    let rendered = helm(&[
        "template",
        &full,
        "charts/kiln",
        "--include-crds",
        "-n",
        &ns,
        "-f",
        values.path(),
    ]);
    let objs = docs(&rendered);
    // The CRD in the chart is the one in crds/ (tests/crd.rs checks the files), so
    // applying it over the shared one changes nothing.
    for crd in [CRD, PIPELINE_CRD] {
        let crd_file =
            std::fs::read_to_string(repo_root().join(format!("crds/{crd}.yaml"))).expect("crds/");
        assert_eq!(
            find(&objs, "CustomResourceDefinition", crd),
            &docs(&crd_file)[0]
        );
    }
    apply(&["-f", "-"], Some(&rendered));
    wait_crd_established();
    // Everything rendered now exists.
    let live = get_all(&rendered);
    assert_eq!(sorted_ids(&live), sorted_ids(&objs), "applied vs rendered");
    for kind in [
        "Deployment",
        "ServiceAccount",
        "ClusterRole",
        "RoleBinding",
        "Role",
        "Service",
        "ServiceMonitor",
    ] {
        assert!(
            live.iter().any(|o| o["kind"] == kind),
            "no {kind} in {:?}",
            ids(&live)
        );
    }

    // The Deployment as the apiserver stored it.
    let fullname = format!("{full}-kiln");
    let d: Value = serde_json::from_str(&kubectl(
        &["get", "deployment", &fullname, "-n", &ns, "-o", "json"],
        None,
    ))
    .expect("JSON");
    assert_eq!(d["spec"]["replicas"], 2);
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], fullname.as_str());
    assert_eq!(
        d["spec"]["template"]["metadata"]["labels"]["team"],
        "images"
    );
    assert_eq!(
        pod["securityContext"],
        json!({"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}})
    );
    let c = &pod["containers"][0];
    assert_eq!(c["args"], json!(["run"]));
    assert_eq!(
        c["securityContext"],
        json!({"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}})
    );
    assert_eq!(
        c["resources"],
        json!({"requests": {"cpu": "123m", "memory": "77Mi"}, "limits": {"cpu": "1", "memory": "333Mi"}})
    );
    assert_eq!(
        c["ports"],
        json!([{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}])
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(
            (&get["path"], &get["port"]),
            (&json!(path), &json!("metrics")),
            "{probe}: {}",
            c[probe]
        );
    }
    let env = env_of(c);
    let value = |k: &str| {
        env.get(k)
            .map(|e| e["value"].clone())
            .unwrap_or_else(|| panic!("no {k} in {env:?}"))
    };
    assert_eq!(value("KILN_LOG"), "info,kiln=debug");
    assert_eq!(value("KILN_LOG_FORMAT"), "text");
    assert_eq!(value("KILN_CONCURRENCY"), "16");
    assert_eq!(value("KILN_NAMESPACE"), json!(format!("{team_a},{team_b}")));
    assert_eq!(value("KILN_METRICS_ADDR"), "0.0.0.0:8080");
    assert_eq!(value("KILN_LEADER_ELECT"), "true");
    assert_eq!(value("KILN_LEADER_ELECTION_NAMESPACE"), json!(ns));
    assert_eq!(
        value("KILN_LEASE_NAME"),
        json!(format!("{fullname}-leader"))
    );
    assert_eq!(value("AWS_REGION"), "us-east-2");
    for (k, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        assert_eq!(env[k]["valueFrom"]["fieldRef"]["fieldPath"], field);
    }
    let sa: Value = serde_json::from_str(&kubectl(
        &["get", "serviceaccount", &fullname, "-n", &ns, "-o", "json"],
        None,
    ))
    .expect("JSON");
    assert_eq!(
        sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
        "arn:aws:iam::123456789012:role/kiln-builder"
    );
    let monitor: Value = serde_json::from_str(&kubectl(
        &["get", "servicemonitor", &fullname, "-n", &ns, "-o", "json"],
        None,
    ))
    .expect("JSON");
    assert_eq!(
        monitor["spec"]["endpoints"],
        json!([{"port": "metrics", "path": "/metrics", "interval": "45s"}])
    );

    // The operator's ServiceAccount: the ImageBuild rules in the watched namespaces
    // only, the Lease in its own.
    let lease = format!("leases.coordination.k8s.io/{fullname}-leader");
    let in_a = |q: &str| format!("{q} -n {team_a}");
    let in_b = |q: &str| format!("{q} -n {team_b}");
    let in_ns = |q: &str| format!("{q} -n {ns}");
    let q: Vec<(String, bool)> = vec![
        (in_a("watch imagebuilds.kiln.dev"), true),
        (in_b("list imagebuilds.kiln.dev"), true),
        (
            in_a("patch imagebuilds.kiln.dev --subresource=status"),
            true,
        ),
        (
            in_b("update imagebuilds.kiln.dev --subresource=finalizers"),
            true,
        ),
        (in_a("get secrets"), true),
        (in_b("create configmaps"), true),
        (in_a("create events.events.k8s.io"), true),
        (in_ns("create leases.coordination.k8s.io"), true),
        (in_ns(&format!("get {lease}")), true),
        (in_ns(&format!("patch {lease}")), true),
        ("list imagebuilds.kiln.dev -A".into(), false),
        (in_ns("list imagebuilds.kiln.dev"), false),
        (in_ns("get secrets"), false),
        (in_a("list secrets"), false),
        // An ImagePipeline creates its builds and deletes them (history, retention).
        (in_a("delete imagebuilds.kiln.dev"), true),
        (in_b("create imagebuilds.kiln.dev"), true),
        (in_b("watch imagepipelines.kiln.dev"), true),
        (
            in_a("patch imagepipelines.kiln.dev --subresource=status"),
            true,
        ),
        (
            in_b("update imagepipelines.kiln.dev --subresource=finalizers"),
            true,
        ),
        (in_ns("list imagepipelines.kiln.dev"), false),
        (in_a("delete imagepipelines.kiln.dev"), false),
        (in_ns(&format!("update {lease}")), false),
        (in_ns("list leases.coordination.k8s.io"), false),
        (in_ns("delete leases.coordination.k8s.io"), false),
        (in_a("create leases.coordination.k8s.io"), false),
    ];
    check_access(
        &ns,
        &fullname,
        &q.iter().map(|(s, b)| (s.as_str(), *b)).collect::<Vec<_>>(),
    );

    // The default values: one ClusterRoleBinding, every namespace.
    let rendered = helm(&[
        "template",
        &plain,
        "charts/kiln",
        "--include-crds",
        "-n",
        &ns_plain,
    ]);
    let objs = docs(&rendered);
    assert!(
        !objs.iter().any(|o| o["kind"] == "ServiceMonitor"),
        "{:?}",
        ids(&objs)
    );
    apply(&["-f", "-"], Some(&rendered));
    assert_eq!(
        sorted_ids(&get_all(&rendered)),
        sorted_ids(&objs),
        "applied vs rendered"
    );
    let fullname = format!("{plain}-kiln");
    let lease = format!("leases.coordination.k8s.io/{fullname}-leader -n {ns_plain}");
    check_access(
        &ns_plain,
        &fullname,
        &[
            ("list imagebuilds.kiln.dev -A", true),
            (
                &format!("patch imagebuilds.kiln.dev --subresource=status -n {team_a}"),
                true,
            ),
            ("get secrets -n default", true),
            (&format!("patch {lease}"), true),
            ("list secrets -A", false),
            ("list imagepipelines.kiln.dev -A", true),
            ("delete imagepipelines.kiln.dev -n default", false),
            (
                &format!("get leases.coordination.k8s.io/{fullname}-leader -n {ns}"),
                false,
            ),
        ],
    );
}

// ---------------------------------------------------------------- kustomize install

/// `kubectl apply -k config/`, for real. tests/common applies parts of config/ too
/// (CRD, namespace, ServiceAccount, ClusterRole and binding) with the same content,
/// so server-side apply with another field manager is a no-op for those. What this
/// adds in kiln-system (the Service and the Lease Role) stays: removing it could pull
/// the Role from under a concurrent run of this test. The Deployment goes: with the
/// one-node cluster its Pod runs.
#[test]
fn kustomize_install_grants_what_the_operator_needs() {
    apply(&["-k", "config/"], None);
    wait_crd_established();
    let rendered = kubectl(&["kustomize", "config/"], None);
    let objs = docs(&rendered);
    assert_eq!(
        sorted_ids(&get_all(&rendered)),
        sorted_ids(&objs),
        "applied vs rendered"
    );
    for kind in [
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Service",
        "Deployment",
    ] {
        assert!(
            objs.iter().any(|o| o["kind"] == kind),
            "config/ has no {kind}: {:?}",
            ids(&objs)
        );
    }

    let lease = "leases.coordination.k8s.io/kiln-leader -n kiln-system";
    check_access(
        "kiln-system",
        "kiln",
        &[
            ("get imagebuilds.kiln.dev -n default", true),
            ("list imagebuilds.kiln.dev -A", true),
            ("watch imagebuilds.kiln.dev -A", true),
            ("patch imagebuilds.kiln.dev -n default", true),
            (
                "patch imagebuilds.kiln.dev --subresource=status -n default",
                true,
            ),
            (
                "update imagebuilds.kiln.dev --subresource=finalizers -n default",
                true,
            ),
            ("get secrets -n default", true),
            ("create secrets -n default", true),
            ("delete secrets -n default", true),
            ("patch secrets -n default", true),
            ("get configmaps -n default", true),
            ("create configmaps -n default", true),
            ("patch configmaps -n default", true),
            ("create events.events.k8s.io -n default", true),
            ("create leases.coordination.k8s.io -n kiln-system", true),
            (&format!("get {lease}"), true),
            (&format!("patch {lease}"), true),
            ("list secrets -n default", false),
            ("watch secrets -A", false),
            ("update secrets -n default", false),
            ("create imagebuilds.kiln.dev -n default", true),
            ("delete imagebuilds.kiln.dev -n default", true),
            ("watch imagepipelines.kiln.dev -A", true),
            (
                "patch imagepipelines.kiln.dev --subresource=status -n default",
                true,
            ),
            (
                "update imagepipelines.kiln.dev --subresource=finalizers -n default",
                true,
            ),
            ("create pods -n default", true),
            ("delete pods -n default", true),
            ("get pods --subresource=log -n default", true),
            ("list pods -n default", false),
            ("update imagebuilds.kiln.dev -n default", false),
            ("create imagepipelines.kiln.dev -n default", false),
            ("delete imagepipelines.kiln.dev -n default", false),
            ("update imagepipelines.kiln.dev -n default", false),
            ("list configmaps -n default", false),
            ("delete configmaps -n default", false),
            ("create events -n default", false),
            (&format!("update {lease}"), false),
            ("watch leases.coordination.k8s.io -n kiln-system", false),
            (
                "delete leases.coordination.k8s.io/kiln-leader -n kiln-system",
                false,
            ),
            ("list leases.coordination.k8s.io -n kiln-system", false),
            (
                "get leases.coordination.k8s.io/kiln-leader -n default",
                false,
            ),
            ("update pods -n default", false),
            ("get nodes", false),
        ],
    );
    // With the test environment's node (cluster mode) the Deployment runs a real
    // kiln that watches every namespace and allows no endpoint: it would act on
    // every later test's builds. The rest stays (see above). Foreground: the
    // Deployment is gone only once its Pods are, so no kiln outlives this test.
    kubectl(
        &[
            "delete",
            "deployment",
            "kiln",
            "-n",
            "kiln-system",
            "--ignore-not-found",
            "--cascade=foreground",
            "--wait",
        ],
        None,
    );
}

// ------------------------------------------------------------------------- drift

/// RBAC rules in a canonical order, each rule's lists sorted: equal when they grant
/// the same, however written.
fn rule_set(rules: &Value) -> Value {
    let mut rules: Vec<Value> = rules
        .as_array()
        .expect("rules")
        .iter()
        .map(|r| {
            let mut r = r.clone();
            for list in r.as_object_mut().expect("rule").values_mut() {
                if let Some(a) = list.as_array_mut() {
                    a.sort_by_key(|v| v.to_string());
                }
            }
            r
        })
        .collect();
    rules.sort_by_key(|r| r.to_string());
    Value::Array(rules)
}

/// What must agree between two installs of the same object (labels and selectors
/// differ on purpose: the chart's carry the release).
fn essence(obj: &Value) -> Value {
    match obj["kind"].as_str().expect("kind") {
        "ClusterRole" | "Role" => rule_set(&obj["rules"]),
        "ClusterRoleBinding" | "RoleBinding" => {
            json!({"roleRef": obj["roleRef"], "subjects": obj["subjects"]})
        }
        "Deployment" => {
            json!({"replicas": obj["spec"]["replicas"], "pod": obj["spec"]["template"]["spec"]})
        }
        "Service" => json!({"type": obj["spec"]["type"], "ports": obj["spec"]["ports"]}),
        "ServiceAccount" => obj["metadata"]["annotations"].clone(),
        other => panic!("no comparison for {other}"),
    }
}

/// The chart with its default values, released as `kiln` in kiln-system, installs
/// what `config/` does: same objects, same RBAC rules, same pod spec.
#[test]
fn kustomize_and_chart_defaults_agree() {
    let chart_objs = docs(&helm(&[
        "template",
        "kiln",
        "charts/kiln",
        "-n",
        "kiln-system",
    ]));
    let plain: Vec<Value> = docs(&kubectl(&["kustomize", "config/"], None))
        .into_iter()
        .filter(|o| o["kind"] != "Namespace" && o["kind"] != "CustomResourceDefinition")
        .collect();
    let key = |o: &Value| {
        format!(
            "{}/{}/{}",
            o["kind"].as_str().unwrap_or_default(),
            o["metadata"]["namespace"].as_str().unwrap_or_default(),
            o["metadata"]["name"].as_str().unwrap_or_default()
        )
    };
    let by_key = |objs: &[Value]| -> BTreeMap<String, Value> {
        objs.iter().map(|o| (key(o), essence(o))).collect()
    };
    let (chart, plain) = (by_key(&chart_objs), by_key(&plain));
    assert_eq!(
        chart.keys().collect::<Vec<_>>(),
        plain.keys().collect::<Vec<_>>(),
        "the chart and config/ install different objects"
    );
    for must in [
        "ClusterRole//kiln",
        "Role/kiln-system/kiln-leader-election",
        "Deployment/kiln-system/kiln",
    ] {
        assert!(chart.contains_key(must), "no {must} in {:?}", chart.keys());
    }
    // The rules the operator's code needs are there (so that agreement is not
    // agreement on nothing).
    let granted: BTreeSet<&str> = find(&chart_objs, "ClusterRole", "kiln")["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .flat_map(|r| r["resources"].as_array().expect("resources"))
        .filter_map(Value::as_str)
        .collect();
    for resource in [
        "imagebuilds",
        "imagebuilds/status",
        "imagebuilds/finalizers",
        "imagepipelines",
        "imagepipelines/status",
        "imagepipelines/finalizers",
        "pods",
        "pods/log",
        "secrets",
        "configmaps",
        "events",
    ] {
        assert!(
            granted.contains(resource),
            "no rule for {resource}: {granted:?}"
        );
    }
    let mut drift = Vec::new();
    for (k, c) in &chart {
        if c != &plain[k] {
            drift.push(format!(
                "{k}:\n  chart:   {}\n  config/: {}",
                serde_json::to_string(c).unwrap_or_default(),
                serde_json::to_string(&plain[k]).unwrap_or_default()
            ));
        }
    }
    assert!(
        drift.is_empty(),
        "charts/kiln (default values) and config/ differ:\n{}",
        drift.join("\n")
    );
}
