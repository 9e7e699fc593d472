//! The README's first command, `bash examples/demo.sh`, run as a user would: an
//! amazon-ebs build against the local EC2 server, streamed step by step, ending with
//! the AMI line; and Ctrl-C stopping exactly what the demo started.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{Ec2Server, TestEnv, repo_root, short_id, tail};
use kiln::api::{BuildPhase, ImageBuild};
use kube::{Api, ResourceExt};

/// The amazon-ebs steps of examples/amazon-ebs.yaml, in the order the README gives.
const STEPS: [&str; 12] = [
    "pre-validate",
    "source-image",
    "key-pair",
    "security-group",
    "instance",
    "instance-ready",
    "connect",
    "shell-1",
    "file-2",
    "stop-instance",
    "create-image",
    "copy-image-eu-west-1",
];

/// Variables of a sourced env.sh that would point the demo at another environment.
const ENV_VARS: [&str; 21] = [
    "KUBECONFIG",
    "KILN_SSH_HOST",
    "KILN_SSH_PORT",
    "KILN_SSH_USER",
    "KILN_SSH_KEY",
    "KILN_SSH_WRONG_KEY",
    "KILN_SSH_KNOWN_HOSTS",
    "KILN_SSH_BAD_KNOWN_HOSTS",
    "KILN_EC2_ENDPOINT",
    "KILN_TEST_BIN",
    "KILN_DEMO_EXIT",
    // The shared environment's node: a demo on its own state dir must not ask for
    // one (one node per machine).
    "KILN_CLUSTER",
    "KILN_NODE_NAME",
    "KILN_NODE_IP",
    "KILN_CONTAINERD_ADDRESS",
    "KILN_POD_APISERVER",
    "KILN_POD_SSH_HOST",
    "KILN_POD_SSH_PORT",
    "KILN_POD_EC2_ENDPOINT",
    "KILN_POD_TOOLS_IMAGE",
    "KILN_POD_PAUSE_IMAGE",
];

/// `bash examples/demo.sh` in its own process group (as a shell runs a foreground
/// job), output to files; killed with its group on drop.
struct Demo {
    child: Option<Child>,
    pgid: i32,
    /// stdout and stderr.
    dir: PathBuf,
    /// What the provisioners write on the build machine (examples/amazon-ebs.yaml).
    host_dir: PathBuf,
    started: Instant,
}

impl Demo {
    fn start(state: &Path, ns: &str, exit_after_ami: bool) -> Demo {
        let dir = std::env::temp_dir().join(format!("kiln-demo-test-{ns}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cmd = Command::new("bash");
        cmd.arg("examples/demo.sh")
            .current_dir(repo_root())
            .env("KILN_TEST_ENV", state)
            .env("KILN_BIN", env!("CARGO_BIN_EXE_kiln"))
            .env("KILN_DEMO_NAMESPACE", ns)
            .env("KILN_DEMO_TIMEOUT", "300")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("stdout")).unwrap())
            .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
            .process_group(0);
        for v in ENV_VARS {
            cmd.env_remove(v);
        }
        if exit_after_ami {
            cmd.env("KILN_DEMO_EXIT", "1");
        }
        let child = cmd.spawn().expect("bash examples/demo.sh");
        Demo {
            pgid: child.id() as i32,
            child: Some(child),
            dir,
            host_dir: PathBuf::from(format!("/tmp/kiln-demo-{ns}")),
            started: Instant::now(),
        }
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.join("stdout")).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    fn output(&self) -> String {
        format!(
            "--- stdout:\n{}\n--- stderr (tail):\n{}",
            self.stdout(),
            tail(&self.stderr(), 40)
        )
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().unwrap()?;
        self.child = None;
        Some(status)
    }

    async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.try_wait() {
                return s;
            }
            assert!(
                start.elapsed() < timeout,
                "the demo did not exit within {timeout:?}\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn signal_group(&self, sig: &str) {
        let ok = Command::new("bash")
            .args(["-c", &format!("kill -{sig} -- -{}", self.pgid)])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} -- -{}", self.pgid);
    }
}

impl Drop for Demo {
    /// Whatever is left in the demo's process group goes, also when a test fails.
    fn drop(&mut self) {
        if self.child.is_some() || !in_groups(&[self.pgid]).is_empty() {
            let _ = Command::new("bash")
                .args(["-c", &format!("kill -KILL -- -{} 2>/dev/null", self.pgid)])
                .status();
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(&self.host_dir);
    }
}

/// (state, pgrp) of a process, from /proc; None once it is gone.
fn proc_stat(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let _ppid = f.next()?;
    Some((state, f.next()?.parse().ok()?))
}

fn alive(pid: i32) -> bool {
    matches!(proc_stat(pid), Some((s, _)) if s != 'Z')
}

/// Live processes in any of these process groups.
fn in_groups(groups: &[i32]) -> Vec<(i32, String)> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Some((s, pgrp)) = proc_stat(pid)
            && s != 'Z'
            && groups.contains(&pgrp)
        {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            found.push((pid, cmd.trim().to_string()));
        }
    }
    found
}

/// Every `<state>/*.pid` file: name -> PID.
fn pid_files(state: &Path) -> BTreeMap<String, i32> {
    let mut pids = BTreeMap::new();
    for e in std::fs::read_dir(state).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name.strip_suffix(".pid")
            && let Ok(text) = std::fs::read_to_string(e.path())
            && let Ok(pid) = text.trim().parse()
        {
            pids.insert(n.to_string(), pid);
        }
    }
    pids
}

/// The streamed progress: (step or `ImageBuild`, phase) per line `  1.2s  name  Phase  note`.
fn progress(out: &str) -> Vec<(String, String)> {
    out.lines()
        .filter_map(|l| {
            let mut t = l.split_whitespace();
            t.next()?.strip_suffix('s')?.parse::<f64>().ok()?;
            Some((t.next()?.to_string(), t.next()?.to_string()))
        })
        .collect()
}

/// `AMI: ami-1 (us-east-1), ami-2 (eu-west-1)` -> [(ami-1, us-east-1), (ami-2, eu-west-1)].
fn ami_line(line: &str) -> Vec<(String, String)> {
    let list = line
        .strip_prefix("AMI: ")
        .unwrap_or_else(|| panic!("the last line is not the AMI line: {line:?}"));
    list.split(", ")
        .map(|item| {
            let (id, region) = item
                .strip_suffix(')')
                .and_then(|s| s.split_once(" ("))
                .unwrap_or_else(|| panic!("{item:?} in {line:?}"));
            assert!(id.starts_with("ami-") && id.len() > 4, "{id:?} in {line:?}");
            (id.to_string(), region.to_string())
        })
        .collect()
}

/// The demo against the shared environment (already up): it reuses the servers,
/// builds a real AMI in the EC2 server, cleans up, and leaves the servers running
/// for the tests beside it.
#[tokio::test(flavor = "multi_thread")]
async fn demo_builds_an_ami_step_by_step_and_leaves_running_servers_alone() {
    let env = TestEnv::load();
    let ec2 = Ec2Server::from_env(&env);
    let servers: BTreeMap<String, i32> = pid_files(&env.dir)
        .into_iter()
        .filter(|(n, _)| !n.starts_with("demo-operator-"))
        .collect();
    for s in ["apiserver", "sshd", "ec2"] {
        let pid = servers.get(s).copied().unwrap_or(-1);
        assert!(alive(pid), "{s} of the shared environment is not running");
    }
    let ns = format!("kiln-demo-{}", short_id());

    let mut demo = Demo::start(&env.dir, &ns, true);
    let status = demo.wait(Duration::from_secs(600)).await;
    let wall = demo.started.elapsed();
    let out = demo.stdout();
    assert_eq!(status.code(), Some(0), "{}", demo.output());

    // One line per change, every step in order, cleanup of the temporary resources.
    let lines = progress(&out);
    let mut first_seen: Vec<&str> = Vec::new();
    for (name, _) in &lines {
        if name != "ImageBuild" && !first_seen.contains(&name.as_str()) {
            first_seen.push(name);
        }
    }
    assert_eq!(first_seen, STEPS, "{out}");
    for (i, line) in lines.iter().enumerate() {
        assert!(!lines[..i].contains(line), "{line:?} printed twice:\n{out}");
    }
    for step in STEPS {
        assert!(
            lines.iter().any(|(n, p)| n == step && p == "Succeeded"),
            "no `{step} Succeeded` line in\n{out}"
        );
    }
    for step in ["key-pair", "security-group", "instance"] {
        assert!(
            lines.iter().any(|(n, p)| n == step && p == "cleanup"),
            "no `{step} cleanup done` line in\n{out}"
        );
    }
    assert_eq!(
        lines.last().map(|(n, p)| (n.as_str(), p.as_str())),
        Some(("ImageBuild", "Succeeded")),
        "{out}"
    );

    // The last line names the AMIs; they are this build's artifacts and exist.
    let amis = ami_line(out.lines().last().unwrap_or_default());
    let regions: Vec<&str> = amis.iter().map(|(_, r)| r.as_str()).collect();
    assert_eq!(regions, ["us-east-1", "eu-west-1"], "{out}");
    let client = env.admin().await;
    let ib = Api::<ImageBuild>::namespaced(client.clone(), &ns)
        .get("demo")
        .await
        .unwrap();
    let uid = ib.uid().unwrap();
    let st = ib.status.clone().unwrap();
    assert_eq!(st.phase, Some(BuildPhase::Succeeded));
    let recorded: Vec<(String, String)> = st
        .artifacts
        .iter()
        .filter(|a| Some(a.generation) == ib.metadata.generation)
        .map(|a| (a.image_id.clone().unwrap(), a.region.clone().unwrap()))
        .collect();
    assert_eq!(amis, recorded);
    for (id, region) in &amis {
        let c = ec2.client(region).await;
        let r = c.describe_images().image_ids(id).send().await.unwrap();
        assert_eq!(r.images().len(), 1, "{region}: {id} not found");
        let img = &r.images()[0];
        assert_eq!(img.state().map(|s| s.as_str()), Some("available"), "{id}");
        assert!(
            img.name().unwrap_or("").starts_with(&format!("{ns}-demo-")),
            "{id}: {:?}",
            img.name()
        );
        assert!(
            img.tags()
                .iter()
                .any(|t| t.key() == Some("built-by") && t.value() == Some("kiln")),
            "{id}: {:?}",
            img.tags()
        );
    }

    // The provisioners ran on the build machine (the loopback sshd) with the build's facts.
    let output = |step: &str, key: &str| {
        st.steps
            .iter()
            .find(|s| s.name == step)
            .and_then(|s| s.outputs.get(key))
            .cloned()
            .unwrap_or_else(|| panic!("no output {key} of {step}"))
    };
    let info = format!(
        "{ns}/demo built on {} from {}",
        output("instance", "instance_id"),
        output("source-image", "source_ami")
    );
    let host_dir = &demo.host_dir;
    assert_eq!(
        std::fs::read_to_string(host_dir.join("build-info"))
            .unwrap()
            .trim(),
        info
    );
    assert!(out.contains(&info), "{out}");
    assert!(host_dir.join("motd").exists());

    let leaked = common::leaks(&ec2, &client, &ns, &uid, &["us-east-1", "eu-west-1"]).await;
    assert!(leaked.is_empty(), "leaked: {leaked:?}");

    // The operator it started is gone; the servers it found running still run.
    let op: i32 = out
        .split("operator running (pid ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no operator pid in\n{out}"));
    assert!(
        !alive(op),
        "the demo's operator (pid {op}) is still running"
    );
    assert!(!env.dir.join(format!("demo-operator-{ns}.pid")).exists());
    for (s, pid) in &servers {
        assert!(
            alive(*pid),
            "the demo stopped {s} (pid {pid}), which it did not start"
        );
    }
    assert!(
        env.dir.join("env.sh").exists(),
        "the demo removed env.sh of a running environment"
    );
    assert!(
        in_groups(&[demo.pgid]).is_empty(),
        "left behind: {:?}",
        in_groups(&[demo.pgid])
    );
    println!(
        "FIGURES: demo against the running environment: {:.1}s from start to exit",
        wall.as_secs_f64()
    );
}

/// Removes a private state dir, stopping whatever still runs there, even when the
/// test fails halfway.
struct PrivateEnv(PathBuf);

impl Drop for PrivateEnv {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .args(["tests/env/down.sh", "--purge"])
            .current_dir(repo_root())
            .env("KILN_TEST_ENV", &self.0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The demo on a state dir of its own (made like `mktemp -d`): it starts its own
/// apiserver, sshd and EC2 server beside any others, and Ctrl-C (SIGINT to its
/// process group) stops all of them and the operator, promptly.
#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_stops_the_operator_and_the_servers_the_demo_started() {
    let id = short_id();
    let state = std::env::temp_dir().join(format!("kiln-demo-env-{id}"));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&state)
        .unwrap();
    let _env = PrivateEnv(state.clone());
    let ns = format!("kiln-demo-{id}");

    let mut demo = Demo::start(&state, &ns, false);
    let ami_at = loop {
        if let Some(line) = demo.stdout().lines().find(|l| l.starts_with("AMI: ")) {
            ami_line(line);
            break demo.started.elapsed();
        }
        if let Some(s) = demo.try_wait() {
            panic!(
                "the demo exited ({s}) before the AMI line\n{}",
                demo.output()
            );
        }
        assert!(
            demo.started.elapsed() < Duration::from_secs(600),
            "no AMI line within 10 minutes\n{}",
            demo.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Still running after the AMI line: it waits for Ctrl-C.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(demo.try_wait().is_none(), "{}", demo.output());

    let pids = pid_files(&state);
    let operator = format!("demo-operator-{ns}");
    for name in ["apiserver", "sshd", "ec2", operator.as_str()] {
        assert!(pids.contains_key(name), "no {name}.pid in {pids:?}");
    }
    for (name, pid) in &pids {
        assert!(alive(*pid), "{name} (pid {pid}) is not running");
    }
    // The servers lead their own process groups; the operator is in the demo's.
    let mut groups: Vec<i32> = vec![demo.pgid];
    groups.extend(
        pids.iter()
            .filter(|(n, _)| **n != operator)
            .map(|(_, p)| *p),
    );
    let running = in_groups(&groups);

    let t = Instant::now();
    demo.signal_group("INT");
    let status = demo.wait(Duration::from_secs(30)).await;
    let stop = t.elapsed();
    assert_eq!(status.code(), Some(130), "{}", demo.output());
    assert!(stop < Duration::from_secs(30));
    for (name, pid) in &pids {
        assert!(!alive(*pid), "{name} (pid {pid}) survived Ctrl-C");
    }
    let left = in_groups(&groups);
    assert!(
        left.is_empty(),
        "left after Ctrl-C: {left:?} (running before: {running:?})"
    );
    assert!(
        !state.join("env.sh").exists(),
        "env.sh outlived the servers"
    );

    let err = demo.stderr();
    let up = err
        .lines()
        .find_map(|l| l.strip_prefix("[kiln-env] up in "))
        .and_then(|s| s.split(';').next())
        .unwrap_or("?");
    println!(
        "FIGURES: demo on a fresh state dir: servers up in {up}, AMI line after {:.1}s, Ctrl-C to exit {:.1}s ({} processes stopped)",
        ami_at.as_secs_f64(),
        stop.as_secs_f64(),
        running.len()
    );
}

/// A build that fails: the demo exits non-zero with the build's status message and
/// prints no AMI line. Runs on a private environment, started before the demo (so
/// the demo must leave it running), because it injects an EC2 fault, which would
/// hit every build on a shared EC2 server.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_build_exits_non_zero_with_the_status_message() {
    let id = short_id();
    let state = std::env::temp_dir().join(format!("kiln-demo-env-{id}"));
    let _env = PrivateEnv(state.clone());
    let up = Command::new("bash")
        .arg("tests/env/up.sh")
        .current_dir(repo_root())
        .env("KILN_TEST_ENV", &state)
        .env_remove("KILN_CLUSTER")
        .output()
        .unwrap();
    assert!(
        up.status.success(),
        "up.sh: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    let servers = pid_files(&state);
    let env_sh = std::fs::read_to_string(state.join("env.sh")).unwrap();
    let endpoint = env_sh
        .lines()
        .find_map(|l| l.strip_prefix("export KILN_EC2_ENDPOINT="))
        .map(|v| v.trim_matches('\'').to_string())
        .expect("KILN_EC2_ENDPOINT in env.sh");
    let ec2 = Ec2Server { endpoint };
    ec2.control(
        "POST",
        "/_kiln/faults",
        Some(
            serde_json::json!({"action": "CreateImage", "count": 0, "code": "UnauthorizedOperation",
            "status": 403, "message": "You are not authorized to perform this operation."}),
        ),
    );
    let ns = format!("kiln-demo-{id}");

    let mut demo = Demo::start(&state, &ns, true);
    let status = demo.wait(Duration::from_secs(600)).await;
    let (out, err) = (demo.stdout(), demo.stderr());
    assert_eq!(status.code(), Some(1), "{}", demo.output());
    let lines = progress(&out);
    assert!(
        lines
            .iter()
            .any(|(n, p)| n == "create-image" && p == "Failed"),
        "{out}"
    );
    assert_eq!(
        lines.last().map(|(n, p)| (n.as_str(), p.as_str())),
        Some(("ImageBuild", "Failed")),
        "{out}"
    );
    assert!(!out.contains("AMI: "), "{out}");
    let message = err
        .lines()
        .find_map(|l| l.strip_prefix("[demo] ERROR: the build failed: "))
        .unwrap_or_else(|| panic!("no failure message in\n{err}"));
    assert!(
        message.contains("CreateImage")
            && message.contains("UnauthorizedOperation")
            && message.contains("not authorized"),
        "{message}"
    );
    for (name, pid) in &servers {
        assert!(
            alive(*pid),
            "the demo stopped {name}, which it did not start"
        );
    }
    assert!(in_groups(&[demo.pgid]).is_empty());
}
