//! Shared harness for integration tests against the real servers that
//! `tests/env/up.sh` starts (kube-apiserver + etcd, sshd). Each test gets its own
//! namespace and its own operator process, scoped to that namespace, running as the
//! `kiln` ServiceAccount under the RBAC from `config/rbac`.
#![allow(dead_code)]

pub mod aws;
pub mod cluster;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kiln::api::{BuildPhase, ImageBuild};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::pinned_kind;
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// What `tests/env/up.sh` wrote to `env.sh`.
#[derive(Clone, Debug)]
pub struct TestEnv {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub ssh_host: String,
    pub ssh_port: u16,
    pub ssh_user: String,
    pub ssh_key: PathBuf,
    pub ssh_wrong_key: PathBuf,
    pub known_hosts: PathBuf,
    pub bad_known_hosts: PathBuf,
}

impl TestEnv {
    pub fn load() -> TestEnv {
        let dir = std::env::var("KILN_TEST_ENV")
            .map(PathBuf::from)
            .unwrap_or_else(|_| repo_root().join(".kiln-test-env"));
        let text = std::fs::read_to_string(dir.join("env.sh")).unwrap_or_else(|e| {
            panic!(
                "no test environment at {} ({e}); start it with `bash tests/env/up.sh`",
                dir.display()
            )
        });
        let mut vars = BTreeMap::new();
        for line in text.lines() {
            let Some(rest) = line.trim().strip_prefix("export ") else {
                continue;
            };
            if let Some((k, v)) = rest.split_once('=') {
                let v = v.trim().trim_matches('"').trim_matches('\'');
                vars.insert(k.to_string(), v.to_string());
            }
        }
        let get = |k: &str| {
            vars.get(k)
                .cloned()
                .unwrap_or_else(|| panic!("{k} missing from {}/env.sh", dir.display()))
        };
        TestEnv {
            kubeconfig: get("KUBECONFIG").into(),
            ssh_host: get("KILN_SSH_HOST"),
            ssh_port: get("KILN_SSH_PORT").parse().expect("KILN_SSH_PORT"),
            ssh_user: get("KILN_SSH_USER"),
            ssh_key: get("KILN_SSH_KEY").into(),
            ssh_wrong_key: get("KILN_SSH_WRONG_KEY").into(),
            known_hosts: get("KILN_SSH_KNOWN_HOSTS").into(),
            bad_known_hosts: get("KILN_SSH_BAD_KNOWN_HOSTS").into(),
            dir,
        }
    }

    pub async fn admin(&self) -> Client {
        client_from(&self.kubeconfig).await
    }
}

pub async fn client_from(path: &Path) -> Client {
    let kc = kube::config::Kubeconfig::read_from(path).expect("kubeconfig");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("kube config");
    Client::try_from(cfg).expect("client")
}

/// Applies multi-document YAML by server-side apply, resolving kinds by discovery.
pub async fn apply_yaml(client: &Client, text: &str) {
    for doc in text.split("\n---") {
        if doc.trim().is_empty()
            || doc
                .lines()
                .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            continue;
        }
        let obj: DynamicObject = serde_yaml::from_str(doc).expect("yaml object");
        let tm = obj.types.clone().expect("apiVersion/kind");
        let gvk = GroupVersionKind::try_from(&tm).expect("gvk");
        let (ar, caps) = pinned_kind(client, &gvk).await.expect("discovery");
        let api: Api<DynamicObject> = match (caps.scope, obj.metadata.namespace.as_deref()) {
            (kube::discovery::Scope::Namespaced, Some(ns)) => {
                Api::namespaced_with(client.clone(), ns, &ar)
            }
            (kube::discovery::Scope::Namespaced, None) => {
                Api::default_namespaced_with(client.clone(), &ar)
            }
            (kube::discovery::Scope::Cluster, _) => Api::all_with(client.clone(), &ar),
        };
        api.patch(
            &obj.name_any(),
            &PatchParams::apply("kiln-tests").force(),
            &Patch::Apply(&obj),
        )
        .await
        .unwrap_or_else(|e| panic!("applying {} {}: {e}", tm.kind, obj.name_any()));
    }
}

/// Installs the CRD and the operator's RBAC (idempotent) and returns a kubeconfig
/// that acts as the operator's ServiceAccount.
pub async fn install(env: &TestEnv) -> PathBuf {
    let client = env.admin().await;
    for kind in ["imagebuilds", "imagepipelines"] {
        let crd = std::fs::read_to_string(repo_root().join(format!("crds/{kind}.kiln.dev.yaml")))
            .unwrap();
        apply_yaml(&client, &crd).await;
    }
    // Every manifest of config/rbac, the namespace first: what the operator may do
    // in tests is exactly what a kustomize install grants.
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_root().join("config/rbac"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yaml")
                && p.file_name().is_some_and(|n| n != "kustomization.yaml")
        })
        .collect();
    files.sort_by_key(|p| (!p.ends_with("namespace.yaml"), p.clone()));
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        apply_yaml(&client, &text).await;
    }
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in ["imagebuilds.kiln.dev", "imagepipelines.kiln.dev"] {
        wait_until(Duration::from_secs(30), "CRD established", || async {
            let c = crds.get(name).await.ok()?;
            let ok = c
                .status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            ok.then_some(())
        })
        .await;
    }

    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "kiln-system");
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(24 * 3600),
            bound_object_ref: None,
        },
        ..Default::default()
    };
    let token = wait_until(Duration::from_secs(30), "service account token", || async {
        sas.create_token_request("kiln", &PostParams::default(), &req)
            .await
            .ok()?
            .status
            .map(|s| s.token)
    })
    .await;
    let admin: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&env.kubeconfig).unwrap()).unwrap();
    let cluster = admin["clusters"][0]["cluster"].clone();
    let kc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": cluster}],
        "users": [{"name": "kiln", "user": {"token": token}}],
        "contexts": [{"name": "kiln", "context": {"cluster": "test", "user": "kiln"}}],
        "current-context": "kiln",
    });
    let path = env
        .dir
        .join(format!("operator-kubeconfig-{}", std::process::id()));
    // Tests of one binary share the path and an operator may be reading it: replace
    // it atomically, never truncate it under a reader.
    let tmp = path.with_extension(format!("tmp-{}", short_id()));
    std::fs::write(&tmp, serde_yaml::to_string(&kc).unwrap()).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One operator process, killed on drop.
pub struct Operator {
    child: Option<Child>,
    pub log: PathBuf,
    /// `host:port` of /metrics, /healthz and /readyz.
    pub metrics: String,
}

/// A loopback port nobody listens on right now, for a server a test starts.
///
/// Picked below the kernel's ephemeral range (32768-60999 by default): a port the
/// kernel handed out for `bind(0)` could be handed out again, to another test's
/// listener or outgoing connection, before our server binds it. That happened: a test
/// connected to another test's sshd through a proxy listening on "its" port.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id().wrapping_mul(7919);
    for _ in 0..12_000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (seed.wrapping_add(n.wrapping_mul(97)) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000-31999");
}

impl Operator {
    pub fn start(kubeconfig: &Path, namespace: &str, log: &Path) -> Operator {
        Operator::start_with(kubeconfig, namespace, log, &[])
    }

    /// Starts `kiln run` watching `namespace` with extra flags, its metrics on a free
    /// loopback port (tests run many operators side by side).
    pub fn start_with(kubeconfig: &Path, namespace: &str, log: &Path, extra: &[&str]) -> Operator {
        Operator::start_custom(kubeconfig, namespace, log, extra, &[])
    }

    /// As `start_with`, with environment variables on top (e.g. `KILN_LOG`).
    pub fn start_custom(
        kubeconfig: &Path,
        namespace: &str,
        log: &Path,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Operator {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let metrics = format!("127.0.0.1:{}", free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["run", "--namespace", namespace, "--kubeconfig"])
            .arg(kubeconfig)
            .args(["--metrics-addr", &metrics])
            .args(extra)
            .env("KILN_LOG", "info,kiln=debug")
            // The EC2 test server on loopback; a test may override it (empty: none).
            .env("KILN_ALLOWED_ENDPOINTS", "http://127.0.0.1:")
            .envs(envs.iter().copied())
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("start operator");
        Operator {
            child: Some(child),
            log: log.to_path_buf(),
            metrics,
        }
    }

    /// GET `path` from the operator's HTTP endpoint: (status code, body).
    pub async fn http_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(&self.metrics).await?;
        s.write_all(
            format!(
                "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                self.metrics
            )
            .as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).to_string();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        Ok((code, body.to_string()))
    }

    /// The value of one sample line of /metrics (`name{labels}` exactly as printed), 0 if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let (code, body) = self.http_get("/metrics").await.expect("scrape /metrics");
        assert_eq!(code, 200, "{body}");
        parse_metric(&body, series)
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILL: no chance to clean up or write anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a graceful exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let c = self.child.as_mut().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let start = Instant::now();
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                self.child = None;
                return s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "operator did not exit on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The value of sample `series` in a Prometheus text exposition, 0 if absent.
pub fn parse_metric(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(series)?;
            rest.strip_prefix(' ')?.trim().parse().ok()
        })
        .unwrap_or(0.0)
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A test's namespace, its SSH secrets and its operator.
pub struct Fixture {
    pub env: TestEnv,
    pub client: Client,
    pub ns: String,
    pub operator_kubeconfig: PathBuf,
    pub operator: Operator,
    /// Scratch directory on the "build machine" (sshd runs on this host).
    pub host_dir: PathBuf,
}

impl Fixture {
    pub async fn new(prefix: &str) -> Fixture {
        let env = TestEnv::load();
        let operator_kubeconfig = install(&env).await;
        let client = env.admin().await;
        let ns = format!("{prefix}-{}", short_id());
        let nss: Api<Namespace> = Api::all(client.clone());
        nss.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
        for (name, key, path) in [
            ("ssh-key", "ssh-privatekey", &env.ssh_key),
            ("wrong-key", "ssh-privatekey", &env.ssh_wrong_key),
            ("known-hosts", "known_hosts", &env.known_hosts),
            ("bad-known-hosts", "known_hosts", &env.bad_known_hosts),
        ] {
            let value = std::fs::read_to_string(path).unwrap();
            secrets
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({
                        "metadata": {"name": name},
                        "stringData": {key: value},
                    }))
                    .unwrap(),
                )
                .await
                .unwrap();
        }
        let logs = env.dir.join("logs");
        std::fs::create_dir_all(&logs).unwrap();
        let operator = Operator::start(&operator_kubeconfig, &ns, &logs.join(format!("{ns}.log")));
        let host_dir = std::env::temp_dir().join("kiln-it").join(&ns);
        std::fs::create_dir_all(&host_dir).unwrap();
        // The SSH user of the test sshd is not necessarily us.
        std::fs::set_permissions(
            &host_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        Fixture {
            env,
            client,
            ns,
            operator_kubeconfig,
            operator,
            host_dir,
        }
    }

    pub fn api(&self) -> Api<ImageBuild> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn restart_operator(&mut self) {
        self.operator.kill();
        let log = self.operator.log.clone();
        self.operator = Operator::start(&self.operator_kubeconfig, &self.ns, &log);
    }

    /// A null-builder ImageBuild against the test sshd with the given provisioners.
    pub fn null_build(&self, name: &str, provisioners: Value) -> Value {
        json!({
            "apiVersion": "kiln.dev/v1alpha1",
            "kind": "ImageBuild",
            "metadata": {"name": name, "namespace": self.ns},
            "spec": {
                "builder": {"null": {}},
                "communicator": {"ssh": {
                    "username": self.env.ssh_user,
                    "host": self.env.ssh_host,
                    "port": self.env.ssh_port,
                    "privateKeySecretRef": {"name": "ssh-key"},
                    "hostKey": {"knownHostsSecretRef": {"name": "known-hosts"}},
                    "timeout": "20s",
                }},
                "provisioners": provisioners,
            }
        })
    }

    pub async fn create(&self, obj: &Value) -> Result<ImageBuild, kube::Error> {
        let ib: ImageBuild = serde_json::from_value(obj.clone()).expect("ImageBuild json");
        self.api().create(&PostParams::default(), &ib).await
    }

    /// Creates through the raw JSON so schema-level rejections are the apiserver's.
    pub async fn create_raw(&self, obj: &Value) -> Result<(), kube::Error> {
        let ar = kube::core::ApiResource::erase::<ImageBuild>(&());
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &self.ns, &ar);
        let o: DynamicObject = serde_json::from_value(obj.clone()).unwrap();
        api.create(&PostParams::default(), &o).await.map(|_| ())
    }

    /// Creates the ImageBuild and waits for it to reach `phase`.
    pub async fn run_to(&self, obj: &Value, phase: BuildPhase, timeout: Duration) -> ImageBuild {
        self.create(obj).await.unwrap();
        let name = obj["metadata"]["name"].as_str().expect("metadata.name");
        self.wait_phase(name, phase, timeout).await
    }

    pub async fn wait_phase(&self, name: &str, phase: BuildPhase, timeout: Duration) -> ImageBuild {
        let api = self.api();
        let what = format!("{}/{name} to reach {phase:?}", self.ns);
        let start = Instant::now();
        loop {
            let ib = api.get(name).await.unwrap();
            let st = ib.status.as_ref().and_then(|s| s.phase);
            if st == Some(phase) {
                return ib;
            }
            if start.elapsed() > timeout {
                panic!(
                    "timed out waiting for {what}; status: {}\noperator log tail:\n{}",
                    serde_json::to_string_pretty(&ib.status).unwrap(),
                    tail(&self.operator.logs(), 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn wait_gone(&self, name: &str, timeout: Duration) {
        let api = self.api();
        wait_until(timeout, &format!("{name} to be deleted"), || async {
            api.get_opt(name).await.unwrap().is_none().then_some(())
        })
        .await;
    }

    pub async fn events(&self) -> Vec<k8s_openapi::api::events::v1::Event> {
        let api: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.client.clone(), &self.ns);
        api.list(&Default::default()).await.unwrap().items
    }

    /// The namespace's Event reasons once every one of `expected` is among them:
    /// Events are posted after the status write they follow, without holding up
    /// the build, so a test that saw the status may not see them yet.
    pub async fn event_reasons_with(&self, expected: &[&str]) -> Vec<String> {
        wait_until(
            Duration::from_secs(10),
            &format!("Events {expected:?}"),
            || async {
                let reasons: Vec<String> = self
                    .events()
                    .await
                    .into_iter()
                    .filter_map(|e| e.reason)
                    .collect();
                expected
                    .iter()
                    .all(|x| reasons.iter().any(|r| r == x))
                    .then_some(reasons)
            },
        )
        .await
    }
}

pub fn condition(ib: &ImageBuild, type_: &str) -> Option<String> {
    ib.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.clone())
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn short_id() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{:x}{}",
        (nanos ^ std::process::id()) & 0xfffff,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// What an amazon-ebs build in `f`'s namespace needs: the `aws` credentials Secret
/// (moto accepts any keys) and a source image of its own; returns that image's ID.
pub async fn aws_setup(f: &Fixture, ec2: &Ec2Server) -> String {
    let secrets: Api<Secret> = Api::namespaced(f.client.clone(), &f.ns);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "aws"},
                "stringData": {"AWS_ACCESS_KEY_ID": "AKIDTEST", "AWS_SECRET_ACCESS_KEY": "kiln-test-secret-key"},
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let loaded = ec2.control(
        "POST",
        "/_kiln/images",
        Some(json!([{"name": format!("base-{}", f.ns), "creation_date": "2025-01-01T00:00:00.000Z"}])),
    );
    loaded["images"][0]["image_id"]
        .as_str()
        .or_else(|| loaded["images"][0].as_str())
        .or_else(|| loaded["images"][0]["ImageId"].as_str())
        .unwrap_or_else(|| panic!("loaded image id in {loaded}"))
        .to_string()
}

/// An amazon-ebs ImageBuild against the EC2 test server; `ebs` overrides builder
/// fields (null removes one). SSH goes to the loopback sshd: moto's instances are not
/// machines.
pub fn ebs_build(
    f: &Fixture,
    ec2: &Ec2Server,
    source_ami: &str,
    name: &str,
    ebs: Value,
    provisioners: Value,
) -> Value {
    let mut b = f.null_build(name, provisioners);
    let mut spec_ebs = json!({
        "region": "us-east-1",
        "endpoint": ec2.endpoint,
        "credentials": {"secretRef": {"name": "aws"}},
        "sourceAMI": source_ami,
        "instanceType": "t3.micro",
        // The generation too: a spec change within the same second must not find
        // the previous generation's image holding the name.
        "amiName": format!("{}-{name}-{{{{ build.generation }}}}-{{{{ build.timestamp }}}}", f.ns),
        "pollInterval": "100ms",
        "waitTimeout": "2m",
    });
    for (k, v) in ebs.as_object().unwrap() {
        if v.is_null() {
            spec_ebs.as_object_mut().unwrap().remove(k);
        } else {
            spec_ebs[k] = v.clone();
        }
    }
    b["spec"]["builder"] = json!({"amazonEBS": spec_ebs});
    b["spec"]["communicator"]["ssh"]
        .as_object_mut()
        .unwrap()
        .remove("privateKeySecretRef");
    b
}

/// EC2 filter for what kiln tagged for the build `uid`.
pub fn tag_filter(uid: &str) -> aws_sdk_ec2::types::Filter {
    aws_sdk_ec2::types::Filter::builder()
        .name("tag:kiln.dev/build-uid")
        .values(uid)
        .build()
}

/// Everything kiln may have made for the build `uid` and not removed, in these
/// regions: live instances, volumes, images and snapshots by its tag, security
/// groups and key pairs by their deterministic names, and its Secrets in `ns`.
/// The images the ImageBuild lists as artifacts (if it still exists), and their
/// snapshots, are not leaks. Each entry starts with the kind.
pub async fn leaks(
    ec2: &Ec2Server,
    client: &Client,
    ns: &str,
    uid: &str,
    regions: &[&str],
) -> Vec<String> {
    let api: Api<ImageBuild> = Api::namespaced(client.clone(), ns);
    let mut keep = Vec::new();
    for ib in api.list(&Default::default()).await.unwrap() {
        if ib.uid().as_deref() == Some(uid) {
            keep.extend(
                ib.status
                    .iter()
                    .flat_map(|s| s.artifacts.iter())
                    .filter_map(|a| a.image_id.clone()),
            );
        }
    }
    leaks_keeping(ec2, client, ns, uid, regions, &keep).await
}

/// As [`leaks`], with the images that may remain (retained artifacts) given.
pub async fn leaks_keeping(
    ec2: &Ec2Server,
    client: &Client,
    ns: &str,
    uid: &str,
    regions: &[&str],
    keep: &[String],
) -> Vec<String> {
    let mut leaks = Vec::new();
    for region in regions {
        let c = ec2.client(region).await;
        let r = c
            .describe_instances()
            .filters(tag_filter(uid))
            .send()
            .await
            .unwrap();
        for i in r.reservations().iter().flat_map(|r| r.instances()) {
            let state = i.state().and_then(|s| s.name()).map(|s| s.as_str());
            if state != Some("terminated") {
                leaks.push(format!(
                    "instance {} {state:?} in {region}",
                    i.instance_id().unwrap_or("?")
                ));
            }
        }
        let r = c.describe_security_groups().send().await.unwrap();
        for g in r.security_groups() {
            if g.group_name().unwrap_or("").contains(uid) {
                leaks.push(format!(
                    "security group {} in {region}",
                    g.group_id().unwrap_or("?")
                ));
            }
        }
        let r = c.describe_key_pairs().send().await.unwrap();
        for k in r.key_pairs() {
            if k.key_name().unwrap_or("").contains(uid) {
                leaks.push(format!(
                    "key pair {} in {region}",
                    k.key_name().unwrap_or("?")
                ));
            }
        }
        let r = c
            .describe_volumes()
            .filters(tag_filter(uid))
            .send()
            .await
            .unwrap();
        for v in r.volumes() {
            let state = v.state().map(|s| s.as_str()).unwrap_or("?");
            if state != "deleted" {
                leaks.push(format!(
                    "volume {} {state} in {region}",
                    v.volume_id().unwrap_or("?")
                ));
            }
        }
        let mut kept_snapshots = Vec::new();
        let r = c
            .describe_images()
            .owners("self")
            .filters(tag_filter(uid))
            .send()
            .await
            .unwrap();
        for i in r.images() {
            let id = i.image_id().unwrap_or("?");
            let snaps = i
                .block_device_mappings()
                .iter()
                .filter_map(|b| b.ebs().and_then(|e| e.snapshot_id()).map(str::to_string));
            if keep.iter().any(|k| k == id) {
                kept_snapshots.extend(snaps);
            } else {
                leaks.push(format!("image {id} in {region}"));
            }
        }
        let r = c
            .describe_snapshots()
            .owner_ids("self")
            .filters(tag_filter(uid))
            .send()
            .await
            .unwrap();
        for snap in r.snapshots() {
            let id = snap.snapshot_id().unwrap_or("?").to_string();
            if !kept_snapshots.contains(&id) {
                leaks.push(format!("snapshot {id} in {region}"));
            }
        }
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    for s in secrets.list(&Default::default()).await.unwrap() {
        if s.name_any().contains(uid) {
            leaks.push(format!("Secret {}", s.name_any()));
        }
    }
    leaks
}

/// The EC2 test server (tests/ec2server): its endpoint and control API.
pub struct Ec2Server {
    pub endpoint: String,
}

impl Ec2Server {
    pub fn from_env(env: &TestEnv) -> Ec2Server {
        let text = std::fs::read_to_string(env.dir.join("env.sh")).unwrap();
        let endpoint = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("export KILN_EC2_ENDPOINT="))
            .map(|v| v.trim_matches('"').trim_matches('\'').to_string())
            .expect("KILN_EC2_ENDPOINT in env.sh: the EC2 test server is not running");
        Ec2Server { endpoint }
    }

    /// A minimal HTTP/1.1 client: the control API is JSON on loopback.
    pub fn control(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        use std::io::{Read, Write};
        let hostport = self
            .endpoint
            .trim_start_matches("http://")
            .trim_end_matches('/');
        let mut s = std::net::TcpStream::connect(hostport).unwrap();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let (head, rest) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
        assert!(
            head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
            "{method} {path}: {head}\n{rest}"
        );
        let rest = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(rest)
        } else {
            rest.to_string()
        };
        serde_json::from_str(&rest).unwrap_or(Value::Null)
    }

    pub async fn client(&self, region: &str) -> aws_sdk_ec2::Client {
        let creds = aws_credential_types::Credentials::new("test", "test", None, None, "tests");
        let conf = aws_sdk_ec2::Config::builder()
            .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
            .region(aws_sdk_ec2::config::Region::new(region.to_string()))
            .endpoint_url(&self.endpoint)
            .credentials_provider(creds)
            .http_client(kiln::builders::amazon::new_http_client())
            .build();
        aws_sdk_ec2::Client::from_conf(conf)
    }
}

fn dechunk(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some((len, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&tail[..n]);
        rest = &tail[n + 2..];
    }
    out
}

/// A row of docs/reference.md's "Build facts" table.
pub struct FactRow {
    /// Its Ansible variable (`kiln_build_name`).
    pub ansible: String,
    /// The builders the table gives it for (`null`, `amazon-ebs`; `pipeline` for
    /// a pipeline's builds only).
    pub builders: std::collections::BTreeSet<String>,
}

/// The rows of the "Build facts" table, by environment variable.
pub fn facts_table() -> std::collections::BTreeMap<String, FactRow> {
    let text = std::fs::read_to_string(repo_root().join("docs/reference.md")).unwrap();
    let start = text
        .find("\n### Build facts\n")
        .expect("docs/reference.md has a ### Build facts section");
    let section = &text[start + 1..];
    let end = section[4..].find("\n#").map_or(section.len(), |i| i + 4);
    let mut rows = std::collections::BTreeMap::new();
    let code = |c: &str| {
        c.strip_prefix('`')
            .and_then(|c| c.strip_suffix('`'))
            .map(str::to_string)
    };
    for line in section[..end].lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 5 {
            continue;
        }
        let Some(name) = code(cells[1]).filter(|n| n.starts_with("KILN_")) else {
            continue;
        };
        let ansible = code(cells[2]).unwrap_or_else(|| panic!("{name}: no Ansible variable"));
        let builders = cells[3]
            .split(',')
            .map(|b| b.trim().trim_matches('`').to_string())
            .filter(|b| !b.is_empty())
            .collect();
        rows.insert(name, FactRow { ansible, builders });
    }
    assert!(!rows.is_empty(), "no rows in ### Build facts");
    rows
}

/// The facts (environment name, Ansible name) a build of `builder` gets.
pub fn facts_for(
    rows: &std::collections::BTreeMap<String, FactRow>,
    builder: &str,
    pipeline: bool,
) -> Vec<(String, String)> {
    rows.iter()
        .filter(|(_, r)| {
            r.builders.contains(builder) || (pipeline && r.builders.contains("pipeline"))
        })
        .map(|(n, r)| (n.clone(), r.ansible.clone()))
        .collect()
}

/// Runs kubectl or helm from the repository's root against `kubeconfig`, with helm's
/// state under `helm_home`, and `stdin` as its input; its output.
pub fn run_tool(
    program: &std::path::Path,
    kubeconfig: &std::path::Path,
    helm_home: &std::path::Path,
    args: &[&str],
    stdin: Option<&str>,
) -> std::process::Output {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(repo_root())
        .env("KUBECONFIG", kubeconfig)
        .env("HELM_CACHE_HOME", helm_home.join("cache"))
        .env("HELM_CONFIG_HOME", helm_home.join("config"))
        .env("HELM_DATA_HOME", helm_home.join("data"))
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", program.display()));
    if let Some(input) = stdin {
        // Written from a thread: a large input must not block against a full stdout.
        // A command that exits without reading it all fails on its own account.
        let mut pipe = child.stdin.take().expect("stdin");
        let input = input.to_string();
        std::thread::spawn(move || {
            let _ = pipe.write_all(input.as_bytes());
        });
    }
    child.wait_with_output().expect("waiting for the command")
}
