//! Runner Pods (issue 5/6): `shellLocal` and `ansible` provisioners run on kiln's
//! side in a Pod of the build's namespace, on the test environment's one-node
//! cluster (real kubelet, containerd and runc), against the test sshd, which the
//! operator (on this host) and the Pods both reach at the node IP. The runner
//! image is tests/env/runner-image.sh's (Dockerfile.runner: ansible-core, OpenSSH,
//! Git), imported by `KILN_CLUSTER=1 bash tests/env/up.sh`.
//!
//! Without the cluster mode these tests say so and pass, unless
//! `KILN_REQUIRE_CLUSTER=1` (set by tests/all.sh, so `.ci/run` runs them).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::aws::Aws;
use common::cluster::{Cluster, cluster};
use common::{Fixture, wait_until};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kiln::api::BuildPhase;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::{Value, json};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A null build whose SSH goes to the test sshd at the node IP, where this host's
/// operator and the runner Pods both reach it.
fn node_build(f: &Fixture, c: &Cluster, name: &str, provisioners: Value) -> Value {
    let mut b = f.null_build(name, provisioners);
    b["spec"]["communicator"]["ssh"]["host"] = json!(c.get("KILN_POD_SSH_HOST"));
    b["spec"]["communicator"]["ssh"]["port"] =
        json!(c.get("KILN_POD_SSH_PORT").parse::<u16>().unwrap());
    b
}

async fn create_secret(f: &Fixture, name: &str, data: Value) {
    Api::<Secret>::namespaced(f.client.clone(), &f.ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}, "stringData": data}))
                .unwrap(),
        )
        .await
        .unwrap();
}

/// The Pod (or Secret) the named step recorded, once it exists.
async fn recorded(f: &Fixture, build: &str, step: &str, kind: &str) -> String {
    let api = f.api();
    wait_until(
        Duration::from_secs(90),
        &format!("{build}: the {kind} of {step}"),
        || async {
            let ib = api.get(build).await.ok()?;
            let st = ib.status?;
            let s = st.steps.iter().find(|s| s.name == step)?;
            Some(s.resources.iter().find(|r| r.kind == kind)?.id.clone())
        },
    )
    .await
}

async fn gone<K>(api: &Api<K>, name: &str) -> bool
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.get_opt(name).await.unwrap().is_none()
}

/// A server process of a test, stopped when the test ends, however it ends.
struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The step's record after the build reached `phase`.
fn step_message(ib: &kiln::api::ImageBuild, step: &str) -> String {
    let st = ib.status.as_ref().unwrap();
    st.steps
        .iter()
        .find(|s| s.name == step)
        .and_then(|s| s.message.clone())
        .unwrap_or_default()
}

// ------------------------------------------------------------------ shellLocal

/// `shellLocal`: the script runs in a runner Pod of the build's namespace (no
/// ServiceAccount token, non-root, read-only root filesystem) with the build facts,
/// its Secret values redacted from the output; the Pod is gone when the build is;
/// a failing script fails the step with its exit code and last lines; an operator
/// killed while it runs finds the same Pod and waits for it (one Pod, one run).
#[tokio::test(flavor = "multi_thread")]
async fn shell_local_runs_in_a_runner_pod_with_the_build_facts() {
    let Some(c) = cluster() else { return };
    let _g = SERIAL.lock().await;
    let mut f = Fixture::new("cl-local").await;
    let image = c.get("KILN_POD_TOOLS_IMAGE");
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(f.client.clone(), &f.ns);
    secrets
        .create(
            &Default::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "token"},
                "stringData": {"value": "s3cr3t-token-value"},
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let local = |script: &[&str]| {
        json!([{"shellLocal": {
            "image": image,
            "inline": script,
            "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "token", "key": "value"}}}],
        }}])
    };
    let ok = f.null_build(
        "facts",
        local(&[
            "test ! -e /var/run/secrets/kubernetes.io/serviceaccount/token",
            "test \"$(id -u)\" = 65532",
            "! touch /should-not-write 2>/dev/null",
            "touch /tmp/can-write",
            "env | grep '^KILN_' | sort",
            "env | grep -o '^KILN_[A-Za-z0-9_]*' | sort -u | sed 's/^/fact:/'",
            "echo \"token is $TOKEN\"",
        ]),
    );
    let ib = f
        .run_to(&ok, BuildPhase::Succeeded, Duration::from_secs(120))
        .await;
    let log = f.operator.logs();
    assert!(
        log.contains("KILN_BUILD_NAME=facts") && log.contains("KILN_STEP=shell-local-1"),
        "{}",
        common::tail(&log, 40)
    );
    assert!(
        log.contains("token is <redacted>"),
        "{}",
        common::tail(&log, 40)
    );
    assert!(!log.contains("s3cr3t-token-value"));
    // Every build fact the table lists for a null build, and no other.
    let seen: BTreeSet<String> = log
        .split("fact:")
        .skip(1)
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .collect();
    let want: BTreeSet<String> = common::facts_for(&common::facts_table(), "null", false)
        .into_iter()
        .map(|(env, _)| env)
        .collect();
    assert_eq!(
        seen, want,
        "the shellLocal step's KILN_* variables against the table"
    );
    let step = ib
        .status
        .unwrap()
        .steps
        .into_iter()
        .find(|s| s.name == "shell-local-1")
        .unwrap();
    let pod = step
        .resources
        .iter()
        .find(|r| r.kind == "Pod")
        .unwrap()
        .id
        .clone();
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(f.client.clone(), &f.ns);
    wait_until(Duration::from_secs(30), "the runner Pod gone", || async {
        pods.get_opt(&pod).await.unwrap().is_none().then_some(())
    })
    .await;

    // A failing script.
    let ib = f
        .run_to(
            &f.null_build("fails", local(&["echo about to fail", "exit 7"])),
            BuildPhase::Failed,
            Duration::from_secs(120),
        )
        .await;
    let msg = ib.status.unwrap().message.unwrap_or_default();
    assert!(
        msg.contains("exited with code 7") && msg.contains("about to fail"),
        "{msg}"
    );

    // An image that cannot be pulled fails the step (after a 30 s grace), saying so.
    let mut bad = f.null_build("no-image", local(&["true"]));
    bad["spec"]["provisioners"][0]["shellLocal"]["image"] = json!("kiln.test/no-such-image:1");
    let ib = f
        .run_to(&bad, BuildPhase::Failed, Duration::from_secs(120))
        .await;
    let msg = ib.status.unwrap().message.unwrap_or_default();
    assert!(
        msg.contains("cannot start its container") && msg.contains("kiln.test/no-such-image:1"),
        "{msg}"
    );

    // The operator killed while the script runs: the same Pod, once.
    f.create(&f.null_build("slow", local(&["sleep 8", "echo slow done"])))
        .await
        .unwrap();
    let api = f.api();
    let name = wait_until(Duration::from_secs(60), "the runner Pod", || async {
        let ib = api.get("slow").await.ok()?;
        let st = ib.status?;
        let s = st.steps.iter().find(|s| s.name == "shell-local-1")?;
        let id = s.resources.iter().find(|r| r.kind == "Pod")?.id.clone();
        pods.get_opt(&id).await.ok()??;
        Some(id)
    })
    .await;
    let uid = pods.get(&name).await.unwrap().metadata.uid;
    f.restart_operator();
    wait_until(Duration::from_secs(60), "the step resumed", || async {
        let ib = api.get("slow").await.ok()?;
        let s = ib
            .status?
            .steps
            .into_iter()
            .find(|s| s.name == "shell-local-1")?;
        (s.attempts >= 2).then_some(())
    })
    .await;
    assert_eq!(
        pods.get(&name).await.unwrap().metadata.uid,
        uid,
        "a second Pod"
    );
    f.wait_phase("slow", BuildPhase::Succeeded, Duration::from_secs(120))
        .await;
    wait_until(Duration::from_secs(30), "the runner Pod gone", || async {
        pods.get_opt(&name).await.unwrap().is_none().then_some(())
    })
    .await;
}

// --------------------------------------------------------------------- ansible

/// A playbook with a role, a template, a handler and a fact-dependent task, as a
/// ConfigMap (`__` for `/`); `fail.yml` fails a task on purpose, `slow.yml` waits
/// and then appends one line per run.
async fn playbooks(f: &Fixture, name: &str) {
    let files = json!({
        "site.yml": "- hosts: web\n  gather_facts: true\n  roles: [site]\n",
        "roles__site__tasks__main.yml": r#"- name: render the page
  ansible.builtin.template:
    src: page.j2
    dest: "{{ target_dir }}/page.txt"
    mode: "0644"
  notify: record the handler
- name: note a Debian machine
  ansible.builtin.copy:
    content: "{{ ansible_facts['distribution'] }} {{ ansible_facts['distribution_major_version'] }}\n"
    dest: "{{ target_dir }}/os.txt"
  when: ansible_facts['os_family'] == 'Debian'
- name: list the build facts
  ansible.builtin.copy:
    content: "{{ query('ansible.builtin.varnames', '^kiln_') | sort | join('\n') }}\n"
    dest: "{{ target_dir }}/facts.txt"
- name: show the token
  ansible.builtin.debug:
    msg: "token is {{ lookup('ansible.builtin.env', 'TOKEN') }}"
- name: never runs (skipTags)
  ansible.builtin.fail:
    msg: skipTags did not skip me
  tags: [never_run]
"#,
        "roles__site__handlers__main.yml": "- name: record the handler\n  ansible.builtin.copy:\n    content: \"handled {{ kiln_build_name }}\\n\"\n    dest: \"{{ target_dir }}/handler.txt\"\n",
        "roles__site__templates__page.j2": "build {{ kiln_build_name }} in {{ kiln_build_namespace }} by {{ kiln_builder }} at {{ kiln_host }}:{{ kiln_port }}; {{ greeting }}\n",
        "fail.yml": "- hosts: all\n  gather_facts: false\n  tasks:\n  - name: a task that works\n    ansible.builtin.ping:\n  - name: refuse on purpose\n    ansible.builtin.fail:\n      msg: the playbook says no\n",
        "slow.yml": "- hosts: all\n  gather_facts: false\n  tasks:\n  - name: wait a while\n    ansible.builtin.command: sleep {{ seconds }}\n  - name: count the run\n    ansible.builtin.shell: echo run >> {{ target_dir }}/runs.txt\n",
    });
    Api::<ConfigMap>::namespaced(f.client.clone(), &f.ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}, "data": files})).unwrap(),
        )
        .await
        .unwrap();
}

fn ansible(c: &Cluster, f: &Fixture, playbook: &str, source: Value, vars: Value) -> Value {
    let mut extra = json!({"target_dir": f.host_dir.display().to_string()});
    for (k, v) in vars.as_object().unwrap() {
        extra[k] = v.clone();
    }
    json!([{"ansible": {
        "image": c.get("KILN_POD_RUNNER_IMAGE"),
        "playbook": playbook,
        "source": source,
        "extraVars": extra,
        "groups": ["web"],
        "skipTags": ["never_run"],
        "verbosity": 1,
        "ansibleCfg": "[defaults]\ndisplay_skipped_hosts = false\n",
        "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "token", "key": "value"}}}],
    }}])
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// The playbook's role, template, handler and fact-dependent task change the
/// host; it sees every build fact the table lists under its Ansible name, the
/// token is redacted, and the Pod and its key Secret are gone afterwards. Then a
/// failing task names itself, and an amazon-ebs build runs a playbook too.
#[tokio::test(flavor = "multi_thread")]
async fn a_playbook_from_a_config_map_changes_the_host_with_the_build_facts() {
    let Some(c) = cluster() else { return };
    let _g = SERIAL.lock().await;
    let f = Fixture::new("an-cm").await;
    create_secret(&f, "token", json!({"value": "s3cr3t-ansible-token"})).await;
    playbooks(&f, "playbook").await;
    let source = json!({"configMap": {"name": "playbook"}});
    let build = node_build(
        &f,
        &c,
        "site",
        ansible(
            &c,
            &f,
            "site.yml",
            source.clone(),
            json!({"greeting": "hello"}),
        ),
    );
    let ib = f
        .run_to(&build, BuildPhase::Succeeded, Duration::from_secs(240))
        .await;
    let dir = &f.host_dir;
    let page = read(dir, "page.txt");
    assert!(
        page.starts_with(&format!(
            "build site in {} by null at {}:{}; hello",
            f.ns,
            c.get("KILN_POD_SSH_HOST"),
            c.get("KILN_POD_SSH_PORT")
        )),
        "{page}"
    );
    assert_eq!(read(dir, "handler.txt"), "handled site\n");
    assert!(read(dir, "os.txt").starts_with("Debian "));
    let seen: BTreeSet<String> = read(dir, "facts.txt").lines().map(str::to_string).collect();
    let rows = common::facts_table();
    let want: BTreeSet<String> = common::facts_for(&rows, "null", false)
        .into_iter()
        .map(|(_, a)| a)
        .collect();
    assert_eq!(
        seen, want,
        "the playbook's kiln_* variables against the table"
    );
    let msg = step_message(&ib, "ansible-1");
    assert!(
        msg.contains("ansible-core 2.19.")
            && msg.contains("ConfigMap playbook (sha1 ")
            && msg.contains("changed="),
        "{msg}"
    );
    let log = f.operator.logs();
    assert!(
        log.contains("token is <redacted>"),
        "{}",
        common::tail(&log, 60)
    );
    assert!(!log.contains("s3cr3t-ansible-token"));
    let pods: Api<Pod> = Api::namespaced(f.client.clone(), &f.ns);
    let secrets: Api<Secret> = Api::namespaced(f.client.clone(), &f.ns);
    let st = ib.status.as_ref().unwrap();
    let rec = st.steps.iter().find(|s| s.name == "ansible-1").unwrap();
    for r in &rec.resources {
        let left = match r.kind.as_str() {
            "Pod" => !gone(&pods, &r.id).await,
            "Secret" => !gone(&secrets, &r.id).await,
            other => panic!("unexpected resource {other}"),
        };
        assert!(!left, "{} {} left after the build", r.kind, r.id);
    }
    assert_eq!(rec.resources.len(), 2, "{:?}", rec.resources);

    // A failing task fails the step with its name.
    let ib = f
        .run_to(
            &node_build(
                &f,
                &c,
                "fails",
                ansible(&c, &f, "fail.yml", source.clone(), json!({})),
            ),
            BuildPhase::Failed,
            Duration::from_secs(240),
        )
        .await;
    let msg = ib.status.unwrap().message.unwrap_or_default();
    assert!(
        msg.contains("spec.provisioners[0].ansible: task \"refuse on purpose\" failed")
            && msg.contains("the playbook says no"),
        "{msg}"
    );

    // A playbook that is not in the ConfigMap: named before any Pod.
    let ib = f
        .run_to(
            &node_build(
                &f,
                &c,
                "missing",
                ansible(&c, &f, "nope.yml", source, json!({})),
            ),
            BuildPhase::Failed,
            Duration::from_secs(120),
        )
        .await;
    let msg = ib.status.unwrap().message.unwrap_or_default();
    assert!(
        msg.contains(
            "spec.provisioners[0].ansible.playbook: \"nope.yml\" is not in ConfigMap playbook"
        ),
        "{msg}"
    );
}

/// An amazon-ebs build (EC2 server, its generated key pair) runs a playbook
/// against its instance: the key the Pod uses is the build's generated one.
#[tokio::test(flavor = "multi_thread")]
async fn an_amazon_ebs_build_runs_a_playbook_with_its_generated_key() {
    let Some(c) = cluster() else { return };
    let _g = SERIAL.lock().await;
    let a = Aws::new("an-ebs").await;
    let f = &a.f;
    create_secret(f, "token", json!({"value": "another-token"})).await;
    playbooks(f, "playbook").await;
    let mut ebs = a.build(
        "ebs",
        json!({}),
        ansible(
            &c,
            f,
            "site.yml",
            json!({"configMap": {"name": "playbook"}}),
            json!({"greeting": "from ebs"}),
        ),
    );
    ebs["spec"]["communicator"]["ssh"]["host"] = json!(c.get("KILN_POD_SSH_HOST"));
    ebs["spec"]["communicator"]["ssh"]["port"] =
        json!(c.get("KILN_POD_SSH_PORT").parse::<u16>().unwrap());
    let ib = f
        .run_to(&ebs, BuildPhase::Succeeded, Duration::from_secs(240))
        .await;
    let page = read(&f.host_dir, "page.txt");
    assert!(
        page.contains("by amazon-ebs at") && page.contains("from ebs"),
        "{page}"
    );
    let seen: BTreeSet<String> = read(&f.host_dir, "facts.txt")
        .lines()
        .map(str::to_string)
        .collect();
    let rows = common::facts_table();
    let mut want: BTreeSet<String> = common::facts_for(&rows, "amazon-ebs", false)
        .into_iter()
        .map(|(_, a)| a)
        .collect();
    // Only with a private address (the EC2 server may give none).
    if !seen.contains("kiln_private_ip") {
        want.remove("kiln_private_ip");
    }
    assert_eq!(
        seen, want,
        "the playbook's kiln_* variables against the table"
    );
    let leaks = a
        .leaks(&kube::ResourceExt::uid(&ib).unwrap(), &["us-east-1"])
        .await;
    assert!(leaks.is_empty(), "{leaks:?}");
}

/// A Git repository served on loopback by `git daemon`: the runner Pod clones
/// it at a branch and runs a playbook from a directory of it; the step records
/// the commit. A revision that is not there names the field.
#[tokio::test(flavor = "multi_thread")]
async fn a_playbook_from_a_git_repository_runs_at_its_revision() {
    let Some(c) = cluster() else { return };
    let _g = SERIAL.lock().await;
    let f = Fixture::new("an-git").await;
    create_secret(&f, "token", json!({"value": "git-token"})).await;
    let root = f.host_dir.join("git");
    let work = root.join("work");
    std::fs::create_dir_all(work.join("ansible")).unwrap();
    std::fs::write(
        work.join("ansible/site.yml"),
        "- hosts: all\n  gather_facts: false\n  tasks:\n  - name: write from git\n    ansible.builtin.copy:\n      content: \"from git {{ kiln_step }}\\n\"\n      dest: \"{{ target_dir }}/git.txt\"\n",
    )
    .unwrap();
    let git = |dir: &Path, args: &[&str]| {
        let out = Command::new("git")
            .args([
                "-c",
                "user.name=kiln",
                "-c",
                "user.email=kiln@test",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    git(&work, &["init", "-q"]);
    git(&work, &["checkout", "-q", "-b", "release"]);
    git(&work, &["add", "."]);
    git(&work, &["commit", "-q", "-m", "the playbook"]);
    let commit = git(&work, &["rev-parse", "HEAD"]);
    git(&root, &["clone", "-q", "--bare", "work", "playbooks.git"]);
    let port = free_port();
    let host = c.get("KILN_POD_SSH_HOST");
    // git-daemon itself, not `git daemon`: `git` would run it as a child that
    // killing `git` leaves behind (holding the test's output open).
    let exec_path = git(&root, &["--exec-path"]);
    let _daemon = Kill(
        Command::new(Path::new(&exec_path).join("git-daemon"))
            .args([
                "--reuseaddr",
                "--export-all",
                "--informative-errors",
                &format!("--base-path={}", root.display()),
                &format!("--listen={host}"),
                &format!("--port={port}"),
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("git://{host}:{port}/playbooks.git");
    let source = |rev: &str| json!({"git": {"url": url, "revision": rev, "path": "ansible"}});
    let ib = f
        .run_to(
            &node_build(
                &f,
                &c,
                "git",
                ansible(&c, &f, "site.yml", source("release"), json!({})),
            ),
            BuildPhase::Succeeded,
            Duration::from_secs(240),
        )
        .await;
    assert_eq!(read(&f.host_dir, "git.txt"), "from git ansible-1\n");
    let msg = step_message(&ib, "ansible-1");
    assert!(msg.contains(&format!("commit {commit}")), "{msg}");

    let ib = f
        .run_to(
            &node_build(
                &f,
                &c,
                "norev",
                ansible(&c, &f, "site.yml", source("no-such-branch"), json!({})),
            ),
            BuildPhase::Failed,
            Duration::from_secs(240),
        )
        .await;
    let msg = ib.status.unwrap().message.unwrap_or_default();
    assert!(
        msg.contains("spec.provisioners[0].ansible.source.git.revision: no-such-branch is not in"),
        "{msg}"
    );

    // Over HTTP with basic authentication (git http-backend): the credentials
    // Secret's username and password; without them the clone is refused and the
    // step names the source.
    let port = free_port();
    let _http = Kill(
        Command::new("python3")
            .arg(common::repo_root().join("tests/env/git-http.py"))
            .arg(&root)
            .args(["kiln", "git-s3cr3t", &host, &port.to_string()])
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    create_secret(
        &f,
        "git-creds",
        json!({"username": "kiln", "password": "git-s3cr3t"}),
    )
    .await;
    let url = format!("http://{host}:{port}/playbooks.git");
    let http = |creds: bool| {
        let mut s = json!({"git": {"url": url, "revision": "release", "path": "ansible"}});
        if creds {
            s["git"]["credentialsSecretRef"] = json!({"name": "git-creds"});
        }
        s
    };
    std::fs::remove_file(f.host_dir.join("git.txt")).unwrap();
    f.run_to(
        &node_build(
            &f,
            &c,
            "http",
            ansible(&c, &f, "site.yml", http(true), json!({})),
        ),
        BuildPhase::Succeeded,
        Duration::from_secs(240),
    )
    .await;
    assert_eq!(read(&f.host_dir, "git.txt"), "from git ansible-1\n");
    let ib = f
        .run_to(
            &node_build(
                &f,
                &c,
                "nocreds",
                ansible(&c, &f, "site.yml", http(false), json!({})),
            ),
            BuildPhase::Failed,
            Duration::from_secs(240),
        )
        .await;
    let msg = ib.status.unwrap().message.unwrap_or_default();
    assert!(
        msg.contains("spec.provisioners[0].ansible.source.git: cannot clone"),
        "{msg}"
    );
    assert!(!f.operator.logs().contains("git-s3cr3t"));
}

/// The operator killed while the playbook runs: the restarted one finds the same
/// Pod and waits for it (one Pod, one run). An ImageBuild deleted mid-playbook:
/// its Pod and key Secret are gone by the time the ImageBuild is.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_operator_waits_for_the_same_playbook_and_a_deleted_build_removes_it() {
    let Some(c) = cluster() else { return };
    let _g = SERIAL.lock().await;
    let mut f = Fixture::new("an-kill").await;
    create_secret(&f, "token", json!({"value": "kill-token"})).await;
    playbooks(&f, "playbook").await;
    let source = json!({"configMap": {"name": "playbook"}});
    f.create(&node_build(
        &f,
        &c,
        "slow",
        ansible(&c, &f, "slow.yml", source.clone(), json!({"seconds": "10"})),
    ))
    .await
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(f.client.clone(), &f.ns);
    let secrets: Api<Secret> = Api::namespaced(f.client.clone(), &f.ns);
    let name = recorded(&f, "slow", "ansible-1", "Pod").await;
    let uid = wait_until(
        Duration::from_secs(90),
        "the runner Pod running",
        || async {
            let p = pods.get_opt(&name).await.ok()??;
            let running = p.status.as_ref()?.phase.as_deref() == Some("Running");
            running.then(|| p.metadata.uid.clone())?
        },
    )
    .await;
    f.restart_operator();
    let api = f.api();
    wait_until(Duration::from_secs(60), "the step resumed", || async {
        let ib = api.get("slow").await.ok()?;
        let s = ib
            .status?
            .steps
            .into_iter()
            .find(|s| s.name == "ansible-1")?;
        (s.attempts >= 2).then_some(())
    })
    .await;
    if let Some(p) = pods.get_opt(&name).await.unwrap() {
        assert_eq!(p.metadata.uid.as_ref(), Some(&uid), "a second runner Pod");
    }
    let ib = f
        .wait_phase("slow", BuildPhase::Succeeded, Duration::from_secs(240))
        .await;
    let st = ib.status.as_ref().unwrap();
    let rec = st.steps.iter().find(|s| s.name == "ansible-1").unwrap();
    assert!(rec.attempts >= 2, "{rec:?}");
    assert_eq!(
        read(&f.host_dir, "runs.txt"),
        "run\n",
        "the playbook ran more than once"
    );
    let log = f.operator.logs();
    assert!(
        log.contains("waiting for the runner Pod an earlier attempt started"),
        "{}",
        common::tail(&log, 40)
    );
    assert!(gone(&pods, &name).await && gone(&secrets, &name).await);

    // Deleted mid-playbook.
    f.create(&node_build(
        &f,
        &c,
        "deleted",
        ansible(&c, &f, "slow.yml", source, json!({"seconds": "60"})),
    ))
    .await
    .unwrap();
    let name = recorded(&f, "deleted", "ansible-1", "Pod").await;
    wait_until(
        Duration::from_secs(90),
        "the runner Pod running",
        || async {
            let p = pods.get_opt(&name).await.ok()??;
            (p.status?.phase.as_deref() == Some("Running")).then_some(())
        },
    )
    .await;
    let secret = recorded(&f, "deleted", "ansible-1", "Secret").await;
    assert!(!gone(&secrets, &secret).await);
    f.api()
        .delete("deleted", &DeleteParams::default())
        .await
        .unwrap();
    let api = f.api();
    wait_until(Duration::from_secs(60), "the ImageBuild gone", || async {
        api.get_opt("deleted").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(
        gone(&pods, &name).await,
        "the runner Pod outlived its ImageBuild"
    );
    assert!(
        gone(&secrets, &secret).await,
        "the key Secret outlived its ImageBuild"
    );
}

// ------------------------------------------------------------------- benchmark

/// A 20-task playbook (facts, commands, files, lines) run by kiln in a runner
/// Pod against the same playbook run by `ansible-playbook` on this host
/// (`KILN_HOST_ANSIBLE`, the same ansible-core; bench/ansible.sh makes it), both
/// over SSH to the test sshd; three runs each, medians into
/// bench/results/ansible-20-tasks.json. kiln's figure is the step's wall time as
/// its status shows it (polled every 50 ms): the Secret and the Pod's creation
/// and start, the playbook, the Pod's end.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark: bash bench/ansible.sh"]
async fn ansible_20_tasks_in_a_runner_pod_against_the_host() {
    let Some(c) = cluster() else { return };
    let host_ansible = std::env::var("KILN_HOST_ANSIBLE").expect("KILN_HOST_ANSIBLE");
    let _g = SERIAL.lock().await;
    let f = Fixture::new("an-bench").await;
    create_secret(&f, "token", json!({"value": "bench-token"})).await;
    let mut tasks = String::from("- hosts: all\n  gather_facts: true\n  tasks:\n");
    for i in 1..=5 {
        tasks.push_str(&format!(
            "  - name: command {i}\n    ansible.builtin.command: \"true\"\n    changed_when: false\n\
             \x20 - name: file {i}\n    ansible.builtin.copy:\n      content: \"file {i} of {{{{ kiln_build_name | default('host') }}}}\\n\"\n      dest: \"{{{{ target_dir }}}}/file-{i}.txt\"\n\
             \x20 - name: line {i}\n    ansible.builtin.lineinfile:\n      path: \"{{{{ target_dir }}}}/lines.txt\"\n      line: \"line {i}\"\n      create: true\n\
             \x20 - name: directory {i}\n    ansible.builtin.file:\n      path: \"{{{{ target_dir }}}}/dir-{i}\"\n      state: directory\n"
        ));
    }
    Api::<ConfigMap>::namespaced(f.client.clone(), &f.ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "bench"}, "data": {"site.yml": tasks}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    let source = json!({"configMap": {"name": "bench"}});
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };

    let mut kiln_runs = Vec::new();
    for run in 1..=3 {
        let name = format!("bench-{run}");
        let dir = f.host_dir.join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let mut p = ansible(&c, &f, "site.yml", source.clone(), json!({}));
        p[0]["ansible"]["extraVars"]["target_dir"] = json!(dir.display().to_string());
        f.create(&node_build(&f, &c, &name, p)).await.unwrap();
        // Status times have whole seconds: the step's start and end are seen by
        // polling every 50 ms instead.
        let api = f.api();
        let (mut started, deadline) = (None, std::time::Instant::now() + Duration::from_secs(300));
        let ended = loop {
            assert!(std::time::Instant::now() < deadline, "{name}: no end");
            let ib = api.get(&name).await.unwrap();
            let step = ib
                .status
                .and_then(|st| st.steps.into_iter().find(|s| s.name == "ansible-1"));
            match step.map(|s| s.phase) {
                Some(kiln::api::StepPhase::Running) if started.is_none() => {
                    started = Some(std::time::Instant::now());
                }
                Some(kiln::api::StepPhase::Succeeded) => break std::time::Instant::now(),
                Some(kiln::api::StepPhase::Failed) => panic!("{name}: the step failed"),
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        kiln_runs.push((ended - started.expect("the step seen running")).as_secs_f64());
        f.wait_phase(&name, BuildPhase::Succeeded, Duration::from_secs(60))
            .await;
        assert!(dir.join("dir-5").is_dir());
    }

    // The same playbook from this host, with the same connection settings.
    let work = f.host_dir.join("host-run");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("site.yml"), &tasks).unwrap();
    let key = work.join("id");
    std::fs::copy(&f.env.ssh_key, &key).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let known = work.join("known_hosts");
    std::fs::copy(&f.env.known_hosts, &known).unwrap();
    let inventory = json!({"all": {"hosts": {"default": {
        "ansible_host": c.get("KILN_POD_SSH_HOST"),
        "ansible_port": c.get("KILN_POD_SSH_PORT").parse::<u16>().unwrap(),
        "ansible_user": f.env.ssh_user,
        "ansible_ssh_private_key_file": key.display().to_string(),
        "ansible_ssh_common_args": format!("-o UserKnownHostsFile={} -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes", known.display()),
    }}}});
    std::fs::write(work.join("inventory.json"), inventory.to_string()).unwrap();
    let mut host_runs = Vec::new();
    for run in 1..=3 {
        let dir = f.host_dir.join(format!("host-{run}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let start = std::time::Instant::now();
        let out = Command::new(&host_ansible)
            .args(["-i", "inventory.json", "-e"])
            .arg(format!("target_dir={}", dir.display()))
            .arg("site.yml")
            .current_dir(&work)
            .env("ANSIBLE_LOCAL_TEMP", work.join(".ansible-tmp"))
            .env("ANSIBLE_NOCOLOR", "1")
            .output()
            .unwrap();
        host_runs.push(start.elapsed().as_secs_f64());
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(dir.join("dir-5").is_dir());
    }
    let (k, h) = (median(kiln_runs.clone()), median(host_runs.clone()));
    let result = json!({
        "scenario": "ansible-20-tasks",
        "tasks": 20,
        "kiln_runner_pod_seconds": kiln_runs,
        "host_ansible_playbook_seconds": host_runs,
        "kiln_median_seconds": k,
        "host_median_seconds": h,
        "ratio": k / h,
        "note": "kiln: the step's wall time (runner Pod created, started, playbook, ended); host: ansible-playbook's wall time. Same ansible-core, same sshd, same connection settings.",
    });
    println!("{}", serde_json::to_string_pretty(&result).unwrap());
    std::fs::write(
        common::repo_root().join("bench/results/ansible-20-tasks.json"),
        serde_json::to_string_pretty(&result).unwrap() + "\n",
    )
    .unwrap();
}
