//! The test environment's one-node cluster (`KILN_CLUSTER=1`): its settings from
//! env.sh, and the tools (kubectl, helm) run against it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

/// What env.sh says about the cluster.
pub struct Cluster {
    pub vars: BTreeMap<String, String>,
}

impl Cluster {
    pub fn get(&self, k: &str) -> String {
        self.vars
            .get(k)
            .cloned()
            .unwrap_or_else(|| panic!("{k} missing from env.sh"))
    }

    pub fn tool(&self, name: &str) -> PathBuf {
        PathBuf::from(self.get("KILN_TEST_BIN")).join(name)
    }

    pub fn run(&self, tool: &str, args: &[&str], stdin: Option<&str>) -> Output {
        let helm_home = PathBuf::from(self.get("KILN_TEST_ENV")).join("helm-home");
        super::run_tool(
            &self.tool(tool),
            Path::new(&self.get("KUBECONFIG")),
            &helm_home,
            args,
            stdin,
        )
    }

    /// Runs it, panicking with its output unless it succeeds; returns stdout.
    pub fn ok(&self, tool: &str, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run(tool, args, stdin);
        assert!(
            out.status.success(),
            "`{tool} {}` failed ({}):\n{}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `helm install` of charts/kiln with these `--set` values (and text logs),
    /// waiting for it.
    pub fn install(&self, release: &str, ns: &str, sets: &[String]) {
        let mut args = vec![
            "install",
            release,
            "charts/kiln",
            "-n",
            ns,
            "--create-namespace",
            "--set",
            "log.format=text",
            "--wait",
            "--timeout",
            "180s",
        ];
        for s in sets {
            args.extend(["--set", s.as_str()]);
        }
        self.ok("helm", &args, None);
    }

    pub fn kubectl(&self, args: &[&str]) -> String {
        self.ok("kubectl", args, None)
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.kubectl(&all)).unwrap()
    }

    /// The logs of every Pod in `ns`, for a failure message.
    pub fn pod_logs(&self, ns: &str) -> String {
        let pods = self.json(&["get", "pods", "-n", ns]);
        let mut out = String::new();
        for p in pods["items"].as_array().into_iter().flatten() {
            let name = p["metadata"]["name"].as_str().unwrap_or_default();
            let o = self.run("kubectl", &["logs", "-n", ns, name, "--tail=40"], None);
            out.push_str(&format!(
                "--- {name}\n{}\n",
                super::tail(&String::from_utf8_lossy(&o.stdout), 40)
            ));
        }
        out
    }
}

/// The cluster, or `None` (with a note) when the environment runs without one.
pub fn cluster() -> Option<Cluster> {
    let env = super::TestEnv::load();
    let text = std::fs::read_to_string(env.dir.join("env.sh")).unwrap();
    let mut vars = BTreeMap::new();
    for line in text.lines() {
        if let Some((k, v)) = line
            .trim()
            .strip_prefix("export ")
            .and_then(|r| r.split_once('='))
        {
            vars.insert(
                k.to_string(),
                v.trim_matches('\'').trim_matches('"').to_string(),
            );
        }
    }
    if vars.get("KILN_CLUSTER").map(String::as_str) != Some("1") {
        assert!(
            std::env::var("KILN_REQUIRE_CLUSTER").as_deref() != Ok("1"),
            "KILN_REQUIRE_CLUSTER=1 but the test environment has no node: KILN_CLUSTER=1 bash tests/env/up.sh"
        );
        eprintln!(
            "no one-node cluster in this test environment (KILN_CLUSTER=1 bash tests/env/up.sh); skipped"
        );
        return None;
    }
    vars.insert("KILN_TEST_ENV".into(), env.dir.display().to_string());
    Some(Cluster { vars })
}
