//! Bad inputs: refused by the apiserver where the schema can say it, otherwise a
//! clear status message. Every message names the field that is wrong.

mod common;

use std::time::Duration;

use common::{Fixture, condition};
use kiln::api::BuildPhase;
use serde_json::{Value, json};

/// Walks object keys and, for numeric segments, array indices.
fn walk<'a>(v: &'a mut Value, path: &[&str]) -> &'a mut Value {
    let mut cur = v;
    for p in path {
        cur = match p.parse::<usize>() {
            Ok(i) if cur.is_array() => cur.get_mut(i),
            _ => cur.get_mut(*p),
        }
        .unwrap_or_else(|| panic!("no {p}"));
    }
    cur
}

fn set(v: &mut Value, path: &[&str], value: Value) {
    let (last, parent) = path.split_last().unwrap();
    walk(v, parent)[*last] = value;
}

fn remove(v: &mut Value, path: &[&str]) {
    let (last, parent) = path.split_last().unwrap();
    walk(v, parent).as_object_mut().unwrap().remove(*last);
}

fn shell(cmds: &[&str]) -> Value {
    json!([{"shell": {"inline": cmds}}])
}

/// Each case: a change to a valid build, and what the apiserver's message must contain.
#[tokio::test(flavor = "multi_thread")]
async fn the_apiserver_refuses_invalid_specs_naming_the_field() {
    let f = Fixture::new("schema").await;
    let base = f.null_build("x", shell(&["true"]));
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Edit, &[&str])> = vec![
        (
            "no builder",
            Box::new(|v| set(v, &["spec", "builder"], json!({}))),
            &["spec.builder", "exactly one builder"],
        ),
        (
            "two builders",
            Box::new(|v| {
                set(
                    v,
                    &["spec", "builder", "amazonEBS"],
                    json!({"region": "us-east-1", "sourceAMI": "ami-0123", "instanceType": "t3.micro", "amiName": "web"}),
                )
            }),
            &["spec.builder", "exactly one builder"],
        ),
        (
            "unknown onError",
            Box::new(|v| set(v, &["spec", "onError"], json!("explode"))),
            &["spec.onError", "Unsupported value"],
        ),
        (
            "unknown artifactPolicy",
            Box::new(|v| set(v, &["spec", "artifactPolicy"], json!("Shred"))),
            &["spec.artifactPolicy", "Unsupported value"],
        ),
        (
            "malformed SSH timeout",
            Box::new(|v| {
                set(
                    v,
                    &["spec", "communicator", "ssh", "timeout"],
                    json!("5 minutes"),
                )
            }),
            &["spec.communicator.ssh.timeout", "must be a duration"],
        ),
        (
            "malformed shell timeout",
            Box::new(|v| {
                set(
                    v,
                    &["spec", "provisioners", "0", "shell", "timeout"],
                    json!("10"),
                )
            }),
            &["spec.provisioners[0].shell.timeout", "must be a duration"],
        ),
        (
            "empty provisioner",
            Box::new(|v| set(v, &["spec", "provisioners"], json!([{}]))),
            &[
                "spec.provisioners[0]",
                "exactly one of shell, file, shellLocal or ansible",
            ],
        ),
        (
            "ansible: a build fact's name in extraVars",
            Box::new(|v| {
                set(
                    v,
                    &["spec", "provisioners"],
                    json!([{"ansible": {"playbook": "site.yml", "source": {"configMap": {"name": "p"}},
                        "extraVars": {"kiln_host": "x"}}}]),
                )
            }),
            &[
                "spec.provisioners[0].ansible.extraVars",
                "kept for the build facts",
            ],
        ),
        (
            "ansible: a playbook path with ..",
            Box::new(|v| {
                set(
                    v,
                    &["spec", "provisioners"],
                    json!([{"ansible": {"playbook": "roles/../../etc/x.yml", "source": {"configMap": {"name": "p"}}}}]),
                )
            }),
            &[
                "spec.provisioners[0].ansible.playbook",
                "must not have a '..' part",
            ],
        ),
        (
            "ansible: both sources",
            Box::new(|v| {
                set(
                    v,
                    &["spec", "provisioners"],
                    json!([{"ansible": {"playbook": "site.yml", "source": {
                        "configMap": {"name": "p"}, "git": {"url": "https://example.com/x.git"}}}}]),
                )
            }),
            &[
                "spec.provisioners[0].ansible.source",
                "set exactly one of configMap or git",
            ],
        ),
        (
            "ansible: a Git URL that is a local path",
            Box::new(|v| {
                set(
                    v,
                    &["spec", "provisioners"],
                    json!([{"ansible": {"playbook": "site.yml", "source": {"git": {"url": "file:///etc"}}}}]),
                )
            }),
            &[
                "spec.provisioners[0].ansible.source.git.url",
                "must be an http://, https://, git:// or ssh:// URL",
            ],
        ),
        (
            "ansible: the group all",
            Box::new(|v| {
                set(
                    v,
                    &["spec", "provisioners"],
                    json!([{"ansible": {"playbook": "site.yml", "source": {"configMap": {"name": "p"}}, "groups": ["all"]}}]),
                )
            }),
            &[
                "spec.provisioners[0].ansible.groups",
                "all and ungrouped are Ansible's own groups",
            ],
        ),
        (
            "ansible: verbosity 9",
            Box::new(|v| {
                set(
                    v,
                    &["spec", "provisioners"],
                    json!([{"ansible": {"playbook": "site.yml", "source": {"configMap": {"name": "p"}}, "verbosity": 9}}]),
                )
            }),
            &["spec.provisioners[0].ansible.verbosity"],
        ),
        (
            "empty inline command",
            Box::new(|v| {
                set(
                    v,
                    &["spec", "provisioners"],
                    json!([{"shell": {"inline": [""]}}]),
                )
            }),
            &["spec.provisioners[0].shell.inline", "must not be empty"],
        ),
        (
            "no inline commands",
            Box::new(|v| {
                set(
                    v,
                    &["spec", "provisioners"],
                    json!([{"shell": {"inline": []}}]),
                )
            }),
            &["spec.provisioners[0].shell.inline"],
        ),
        (
            "shell with no body",
            Box::new(|v| {
                set(
                    v,
                    &["spec", "provisioners"],
                    json!([{"shell": {"timeout": "1m"}}]),
                )
            }),
            &[
                "spec.provisioners[0].shell",
                "exactly one of inline or scriptFrom",
            ],
        ),
        (
            "no host key policy",
            Box::new(|v| remove(v, &["spec", "communicator", "ssh", "hostKey"])),
            &["spec.communicator.ssh.hostKey", "Required value"],
        ),
        (
            "insecureIgnore false and no known_hosts",
            Box::new(|v| {
                set(
                    v,
                    &["spec", "communicator", "ssh", "hostKey"],
                    json!({"insecureIgnore": false}),
                )
            }),
            &[
                "spec.communicator.ssh.hostKey",
                "knownHostsSecretRef or insecureIgnore",
            ],
        ),
        (
            "null builder without host",
            Box::new(|v| remove(v, &["spec", "communicator", "ssh", "host"])),
            &["communicator.ssh.host is required with the null builder"],
        ),
        (
            "relative file destination",
            Box::new(|v| {
                set(
                    v,
                    &["spec", "provisioners"],
                    json!([{"file": {"destination": "etc/app.conf", "from": {"configMapKeyRef": {"name": "a", "key": "b"}}}}]),
                )
            }),
            &["spec.provisioners[0].file.destination"],
        ),
        (
            "file mode not octal",
            Box::new(|v| {
                set(
                    v,
                    &["spec", "provisioners"],
                    json!([{"file": {"destination": "/etc/x", "mode": "rw-r--r--", "from": {"configMapKeyRef": {"name": "a", "key": "b"}}}}]),
                )
            }),
            &["spec.provisioners[0].file.mode"],
        ),
        (
            "invalid env var name",
            Box::new(|v| {
                set(
                    v,
                    &["spec", "provisioners", "0", "shell", "env"],
                    json!([{"name": "1-BAD", "value": "x"}]),
                )
            }),
            &["spec.provisioners[0].shell.env[0].name"],
        ),
        (
            "port out of range",
            Box::new(|v| set(v, &["spec", "communicator", "ssh", "port"], json!(70000))),
            &["spec.communicator.ssh.port"],
        ),
    ];
    let mut failures = Vec::new();
    for (i, (what, edit, expect)) in cases.iter().enumerate() {
        let mut obj = base.clone();
        set(&mut obj, &["metadata", "name"], json!(format!("bad-{i}")));
        edit(&mut obj);
        failures.extend(refusal_problems(&f, &obj, what, expect).await);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// What is wrong with the apiserver's refusal of `obj`: none when it refuses it as
/// invalid (422) with a message containing each of `expect`.
async fn refusal_problems(f: &Fixture, obj: &Value, what: &str, expect: &[&str]) -> Vec<String> {
    let mut problems = Vec::new();
    match f.create_raw(obj).await {
        Ok(()) => problems.push(format!("{what}: accepted")),
        Err(kube::Error::Api(s)) => {
            for e in expect {
                if !s.message.contains(e) {
                    problems.push(format!("{what}: message lacks {e:?}: {}", s.message));
                }
            }
            if s.code != 422 {
                problems.push(format!("{what}: code {} ({})", s.code, s.message));
            }
        }
        Err(e) => problems.push(format!("{what}: {e}")),
    }
    problems
}

async fn fails_with(f: &Fixture, name: &str, obj: Value, expect: &[&str]) {
    f.create(&obj).await.unwrap();
    let ib = f
        .wait_phase(name, BuildPhase::Failed, Duration::from_secs(45))
        .await;
    let msg = ib
        .status
        .as_ref()
        .and_then(|s| s.message.clone())
        .unwrap_or_default();
    for e in expect {
        assert!(msg.contains(e), "{name}: message lacks {e:?}: {msg}");
    }
    assert_eq!(condition(&ib, "Stalled").as_deref(), Some("True"), "{name}");
}

#[tokio::test(flavor = "multi_thread")]
async fn runtime_problems_fail_the_build_with_a_clear_message() {
    let f = Fixture::new("runtime").await;

    let mut missing = f.null_build("missing-secret", shell(&["true"]));
    set(
        &mut missing,
        &["spec", "communicator", "ssh", "privateKeySecretRef"],
        json!({"name": "nope"}),
    );

    let mut wrong_key = f.null_build("wrong-key", shell(&["true"]));
    set(
        &mut wrong_key,
        &["spec", "communicator", "ssh", "privateKeySecretRef"],
        json!({"name": "wrong-key"}),
    );

    let mut mismatch = f.null_build("host-key-mismatch", shell(&["true"]));
    set(
        &mut mismatch,
        &["spec", "communicator", "ssh", "hostKey"],
        json!({"knownHostsSecretRef": {"name": "bad-known-hosts"}}),
    );

    let mut unreachable = f.null_build("unreachable", shell(&["true"]));
    // Port 9 (discard) is closed on loopback here: connection refused until the timeout.
    set(
        &mut unreachable,
        &["spec", "communicator", "ssh", "port"],
        json!(9),
    );
    set(
        &mut unreachable,
        &["spec", "communicator", "ssh", "timeout"],
        json!("3s"),
    );

    let missing_cm = f.null_build(
        "missing-configmap",
        json!([{"file": {"destination": "/tmp/x", "from": {"configMapKeyRef": {"name": "absent", "key": "k"}}}}]),
    );
    let mut missing_key = f.null_build("missing-known-hosts-key", shell(&["true"]));
    set(
        &mut missing_key,
        &["spec", "communicator", "ssh", "hostKey"],
        json!({"knownHostsSecretRef": {"name": "known-hosts", "key": "other"}}),
    );

    tokio::join!(
        fails_with(
            &f,
            "missing-secret",
            missing,
            &[
                "spec.communicator.ssh.privateKeySecretRef",
                "Secret",
                "nope",
                "not found"
            ],
        ),
        fails_with(
            &f,
            "wrong-key",
            wrong_key,
            &["spec.communicator.ssh", "authentication failed"]
        ),
        fails_with(
            &f,
            "host-key-mismatch",
            mismatch,
            &["spec.communicator.ssh.hostKey", "host key"]
        ),
        fails_with(
            &f,
            "unreachable",
            unreachable,
            &["spec.communicator.ssh", "refused", "timeout of 3s"]
        ),
        fails_with(
            &f,
            "missing-configmap",
            missing_cm,
            &[
                "spec.provisioners[0].file.from.configMapKeyRef",
                "ConfigMap",
                "absent",
                "not found"
            ],
        ),
        fails_with(
            &f,
            "missing-known-hosts-key",
            missing_key,
            &[
                "spec.communicator.ssh.hostKey.knownHostsSecretRef",
                "no key \"other\""
            ],
        ),
    );
    // `kubectl get -o wide` shows why, in a column of its own.
    let out = std::process::Command::new(f.env.dir.join("bin/kubectl"))
        .args(["get", "ib", "missing-secret", "-o", "wide", "-n", &f.ns])
        .env("KUBECONFIG", &f.env.kubeconfig)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().next().is_some_and(|h| h.contains("MESSAGE"))
            && text.contains("Secret")
            && text.contains("not found"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Invalid amazon-ebs fields, each refused by the apiserver with a message that
/// names the field: (what, path under `spec.builder.amazonEBS`, value, what the
/// message must contain). The table is what the schema checks; what only EC2 can
/// tell is in `amazon_specs_refused_before_anything_is_created`.
#[tokio::test(flavor = "multi_thread")]
async fn the_apiserver_refuses_invalid_amazon_specs_naming_the_field() {
    let f = Fixture::new("schema-ebs").await;
    let ec2 = common::Ec2Server::from_env(&f.env);
    let base = common::ebs_build(&f, &ec2, "ami-0123abcd", "x", json!({}), shell(&["true"]));
    let long = "a".repeat(300);
    let cases: Vec<(&str, &[&str], Value, &[&str])> = vec![
        ("empty region", &["region"], json!(""), &["region"]),
        (
            "region with spaces",
            &["region"],
            json!("eu west 1"),
            &["region", "should match"],
        ),
        (
            "region in capitals",
            &["region"],
            json!("EU-WEST-1"),
            &["region", "should match"],
        ),
        (
            "region too long",
            &["region"],
            json!(format!("eu-{long}-1")),
            &["region"],
        ),
        (
            "copy region malformed",
            &["amiRegions"],
            json!(["eu-west-1", "mars"]),
            &["amiRegions[1]", "should match"],
        ),
        (
            "copy region twice",
            &["amiRegions"],
            json!(["eu-west-1", "eu-west-1"]),
            &["amiRegions[1]", "Duplicate"],
        ),
        (
            "copy region empty",
            &["amiRegions"],
            json!([""]),
            &["amiRegions[0]"],
        ),
        (
            "sshCIDRs not a CIDR",
            &["sshCIDRs"],
            json!(["10.0.0.0/33"]),
            &["sshCIDRs", "must be a CIDR"],
        ),
        (
            "sshCIDRs a host",
            &["sshCIDRs"],
            json!(["10.0.0.1"]),
            &["sshCIDRs", "must be a CIDR"],
        ),
        (
            "sshCIDRs a word",
            &["sshCIDRs"],
            json!(["office"]),
            &["sshCIDRs", "must be a CIDR"],
        ),
        ("sshCIDRs empty", &["sshCIDRs"], json!([]), &["sshCIDRs"]),
        (
            "manifest name with capitals",
            &["manifestConfigMap", "name"],
            json!("My_Manifest"),
            &["manifestConfigMap.name", "should match"],
        ),
        (
            "manifest name empty",
            &["manifestConfigMap", "name"],
            json!(""),
            &["manifestConfigMap.name"],
        ),
        (
            "credentials Secret name invalid",
            &["credentials", "secretRef", "name"],
            json!("aws creds"),
            &["credentials.secretRef.name", "should match"],
        ),
        (
            "no instance type",
            &["instanceType"],
            json!(""),
            &["instanceType"],
        ),
        (
            "AMI name too short",
            &["amiName"],
            json!("ab"),
            &["amiName"],
        ),
        (
            "AMI name too long",
            &["amiName"],
            json!("a".repeat(129)),
            &["amiName"],
        ),
        (
            "source AMI malformed",
            &["sourceAMI"],
            json!("image-1"),
            &["sourceAMI", "should match"],
        ),
        (
            "source AMI and filter",
            &["sourceAMIFilter"],
            json!({"owners": ["self"]}),
            &["exactly one of sourceAMI or sourceAMIFilter"],
        ),
        (
            "endpoint not a URL",
            &["endpoint"],
            json!("ec2.local"),
            &["endpoint", "should match"],
        ),
        (
            "reserved tag",
            &["tags"],
            json!({"kiln.dev/build-uid": "x"}),
            &["tags", "reserved"],
        ),
        (
            "AWS tag",
            &["snapshotTags"],
            json!({"aws:x": "y"}),
            &["snapshotTags", "reserved"],
        ),
        (
            "reserved run tag",
            &["runTags"],
            json!({"kiln.dev/generation": "1"}),
            &["runTags", "reserved"],
        ),
        (
            "too many tags",
            &["tags"],
            json!(
                (0..46)
                    .map(|i| (format!("k{i}"), json!("v")))
                    .collect::<serde_json::Map<_, _>>()
            ),
            &["tags"],
        ),
        (
            "wait timeout too long a number",
            &["waitTimeout"],
            json!("5000000000s"),
            &["waitTimeout", "must be a duration"],
        ),
        (
            "poll interval in days",
            &["pollInterval"],
            json!("1d"),
            &["pollInterval", "must be a duration"],
        ),
        (
            "unknown SSH interface",
            &["sshInterface"],
            json!("ipv6"),
            &["sshInterface", "Unsupported value"],
        ),
        (
            "volume size zero",
            &["blockDeviceMappings"],
            json!([{"deviceName": "/dev/sdf", "volumeSize": 0}]),
            &["blockDeviceMappings[0].volumeSize"],
        ),
        (
            "device name relative",
            &["blockDeviceMappings"],
            json!([{"deviceName": "sdf"}]),
            &["blockDeviceMappings[0].deviceName"],
        ),
        (
            "AMI description too long",
            &["amiDescription"],
            json!("d".repeat(256)),
            &["amiDescription"],
        ),
        (
            "user data too long",
            &["userData"],
            json!("u".repeat(16385)),
            &["userData"],
        ),
        (
            "filter without owners",
            &["sourceAMIFilter"],
            json!({"filters": {"name": "x"}}),
            &["sourceAMIFilter", "owners is required"],
        ),
        (
            "too many owners",
            &["sourceAMIFilter"],
            json!({"owners": vec!["self"; 51]}),
            &["sourceAMIFilter.owners"],
        ),
    ];
    let mut failures = Vec::new();
    for (i, (what, path, value, expect)) in cases.iter().enumerate() {
        let mut obj = base.clone();
        set(&mut obj, &["metadata", "name"], json!(format!("ebs-{i}")));
        let ebs = walk(&mut obj, &["spec", "builder", "amazonEBS"]);
        if *what == "source AMI and filter" {
            // Both set: keep sourceAMI.
        } else if path[0] == "sourceAMIFilter" {
            ebs.as_object_mut().unwrap().remove("sourceAMI");
        }
        let mut at = ebs;
        for p in &path[..path.len() - 1] {
            if at.get(*p).is_none() {
                at[*p] = json!({});
            }
            at = at.get_mut(*p).unwrap();
        }
        at[path[path.len() - 1]] = value.clone();
        failures.extend(refusal_problems(&f, &obj, what, expect).await);
    }
    println!(
        "FIGURES: {} amazon-ebs specs refused at admission",
        cases.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// What the schema cannot know, refused by the plan (at once, no step runs) or by
/// `pre-validate` (the first step, before anything is created), naming the field.
#[tokio::test(flavor = "multi_thread")]
async fn amazon_specs_refused_before_anything_is_created() {
    let f = Fixture::new("early-ebs").await;
    let ec2 = common::Ec2Server::from_env(&f.env);
    let ami = common::aws_setup(&f, &ec2).await;
    let build =
        |name: &str, ebs: Value| common::ebs_build(&f, &ec2, &ami, name, ebs, shell(&["true"]));
    let huge = "echo ".to_string() + &"x".repeat(1000);
    let mut too_big = build("too-big", json!({}));
    too_big["spec"]["provisioners"] = json!([{"shell": {"inline": vec![huge; 800]}}]);
    let cases: Vec<(&str, Value, &[&str], bool)> = vec![
        (
            "unknown-variable",
            build(
                "unknown-variable",
                json!({"amiName": "web-{{ build.time }}"}),
            ),
            &[
                "spec.builder.amazonEBS.amiName",
                "unknown variable {{ build.time }}",
            ],
            true,
        ),
        ("too-big", too_big, &["spec:", "KiB", "ConfigMap"], true),
        (
            "no-such-region",
            build("no-such-region", json!({"region": "us-nowhere-9"})),
            &["spec.builder.amazonEBS.region", "us-nowhere-9"],
            false,
        ),
        (
            "no-such-copy-region",
            build(
                "no-such-copy-region",
                json!({"amiRegions": ["eu-west-1", "xx-nowhere-1"]}),
            ),
            &["spec.builder.amazonEBS.amiRegions[1]", "xx-nowhere-1"],
            false,
        ),
        (
            "no-such-subnet",
            build(
                "no-such-subnet",
                json!({"subnetId": "subnet-0000000000000000"}),
            ),
            &["spec.builder.amazonEBS.subnetId", "not found"],
            false,
        ),
        (
            "no-such-group",
            build(
                "no-such-group",
                json!({"securityGroupIds": ["sg-00000000000000000"]}),
            ),
            &[
                "spec.builder.amazonEBS.securityGroupIds",
                "sg-00000000000000000",
                "not found",
            ],
            false,
        ),
    ];
    for (name, obj, _, _) in &cases {
        f.create(obj)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for (name, _, expect, at_once) in &cases {
        let ib = f
            .wait_phase(name, BuildPhase::Failed, Duration::from_secs(45))
            .await;
        let st = ib.status.clone().unwrap();
        let msg = st.message.clone().unwrap_or_default();
        for e in *expect {
            assert!(msg.contains(e), "{name}: message lacks {e:?}: {msg}");
        }
        if *at_once {
            assert!(st.steps.is_empty(), "{name}: a step ran: {:?}", st.steps);
        } else {
            let failed: Vec<_> = st
                .steps
                .iter()
                .filter(|s| s.phase != kiln::api::StepPhase::Pending)
                .map(|s| s.name.as_str())
                .collect();
            assert_eq!(
                failed,
                ["pre-validate"],
                "{name}: nothing but pre-validate may run"
            );
        }
    }
}
