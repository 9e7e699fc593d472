//! kiln's container image, made two ways: the `Dockerfile` (for users with Docker;
//! no container engine runs here) and `tests/env/image.sh` (no daemon, no registry:
//! the release binary on a minimal Debian root filesystem, an OCI layout made with
//! umoci, which the cluster mode of the test environment imports into containerd).
//! The two must agree, and these tests say so by reading both: the Dockerfile's
//! final stage, parsed here on its own, against the OCI image config and the files
//! of the layout image.sh writes (from the binary cargo built for these tests,
//! stripped as the Dockerfile strips the release binary).
//!
//! The runner image (`Dockerfile.runner`, what the runner Pods of shellLocal and
//! ansible provisioners run) is made the same two ways, by `tests/env/runner-image.sh`
//! from this Debian machine's files and PyPI wheels; the tests at the end check it.
//!
//! image.sh reads USER, ENTRYPOINT, CMD, EXPOSE, LABEL and the COPY destination
//! from the Dockerfile, so a change there follows; what it cannot mirror (another
//! base image, ENV, RUN, a shell-form ENTRYPOINT, ...) it refuses, and a change to
//! the script that no longer matches the Dockerfile fails here.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::repo_root;
use serde_json::Value;

/// The base image.sh mirrors, and what the image gets from it.
const BASE: &str = "gcr.io/distroless/cc-debian12:nonroot";
const BASE_ENV: &[&str] = &[
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
];
const BASE_WORKDIR: &str = "/home/nonroot";
const CA_BUNDLE: &str = "etc/ssl/certs/ca-certificates.crt";

/// The final stage of a Dockerfile, as these tests understand it.
#[derive(Debug, Default)]
struct Stage {
    from: String,
    /// The sources and destination of each COPY, flags dropped.
    copies: Vec<Vec<String>>,
    user: Option<String>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    expose: BTreeSet<String>,
    labels: BTreeMap<String, String>,
    /// Any other instruction.
    other: Vec<String>,
}

/// Splits like a shell: whitespace outside quotes, "double" (with \ escapes) and
/// 'single' quotes removed.
fn shell_words(s: &str) -> Vec<String> {
    let (mut words, mut cur, mut in_word) = (Vec::new(), String::new(), false);
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => cur.extend(chars.next()),
                        c => cur.push(c),
                    }
                }
            }
            '\'' => {
                in_word = true;
                cur.extend(chars.by_ref().take_while(|&c| c != '\''));
            }
            '\\' => {
                in_word = true;
                cur.extend(chars.next());
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

fn final_stage(dockerfile: &str) -> Stage {
    // Instructions: comments dropped, continuation lines joined.
    let mut instructions = Vec::new();
    let mut cur = String::new();
    for line in dockerfile.lines() {
        let t = line.trim();
        if t.starts_with('#') || (cur.is_empty() && t.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => {
                cur.push_str(part);
                cur.push(' ');
            }
            None => {
                cur.push_str(t);
                instructions.push(std::mem::take(&mut cur));
            }
        }
    }
    let mut stage = Stage::default();
    for ins in instructions {
        let (word, rest) = ins.split_once(char::is_whitespace).unwrap_or((&ins, ""));
        let rest = rest.trim();
        let json_array = |what: &str| -> Vec<String> {
            serde_json::from_str(rest)
                .unwrap_or_else(|e| panic!("{what} {rest}: not a JSON array of strings: {e}"))
        };
        match word.to_ascii_uppercase().as_str() {
            "FROM" => {
                stage = Stage {
                    from: rest.split_whitespace().next().unwrap_or_default().into(),
                    ..Stage::default()
                }
            }
            "COPY" => {
                let paths: Vec<String> = shell_words(rest)
                    .into_iter()
                    .filter(|w| !w.starts_with("--"))
                    .collect();
                stage.copies.push(paths);
            }
            "USER" => stage.user = Some(rest.into()),
            "ENTRYPOINT" => stage.entrypoint = Some(json_array("ENTRYPOINT")),
            "CMD" => stage.cmd = Some(json_array("CMD")),
            "EXPOSE" => stage.expose.extend(rest.split_whitespace().map(|p| {
                if p.contains('/') {
                    p.to_string()
                } else {
                    format!("{p}/tcp")
                }
            })),
            "LABEL" => {
                for kv in shell_words(rest) {
                    let (k, v) = kv
                        .split_once('=')
                        .unwrap_or_else(|| panic!("LABEL {rest}: want KEY=VALUE"));
                    stage.labels.insert(k.into(), v.into());
                }
            }
            _ => stage.other.push(ins.clone()),
        }
    }
    stage
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn stdout_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} exited with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A fresh scratch dir under cargo's target dir for integration tests.
fn scratch(name: &str) -> PathBuf {
    let d =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("image-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `tests/env/image.sh` with the binary cargo built for these tests, into LAYOUT,
/// no import into containerd.
fn image_sh(layout: &Path, dockerfile: Option<&Path>) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("tests/env/image.sh"))
        .args([
            "--binary",
            env!("CARGO_BIN_EXE_kiln"),
            "--no-import",
            "--layout",
        ])
        .arg(layout);
    if let Some(d) = dockerfile {
        cmd.arg("--dockerfile").arg(d);
    }
    run(&mut cmd)
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn blob(layout: &Path, digest: &Value) -> PathBuf {
    let d = digest.as_str().expect("a digest");
    let hex = d.strip_prefix("sha256:").expect("a sha256 digest");
    layout.join("blobs/sha256").join(hex)
}

/// The chart's default image of `section` (`image` for kiln's, `runner` for the
/// runner's): its repository, and its tag or the appVersion.
fn chart_image(section: &str) -> (String, String) {
    let values: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo_root().join("charts/kiln/values.yaml")).unwrap(),
    )
    .unwrap();
    let chart: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo_root().join("charts/kiln/Chart.yaml")).unwrap(),
    )
    .unwrap();
    let repo = values[section]["repository"]
        .as_str()
        .unwrap_or_else(|| panic!("charts/kiln/values.yaml: {section}.repository"))
        .to_string();
    let tag = match values[section]["tag"].as_str() {
        Some(t) if !t.is_empty() => t.to_string(),
        _ => chart["appVersion"].as_str().unwrap().to_string(),
    };
    (repo, tag)
}

/// The layout `script` (in tests/env) wrote, once its run `out` succeeded: tagged as
/// the chart's default image of `section`, which `script --ref` prints, so the chart
/// runs it unchanged. Its config and layers.
fn built_layout(script: &str, out: &Output, layout: &Path, section: &str) -> (Value, Vec<PathBuf>) {
    assert!(
        out.status.success(),
        "tests/env/{script} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (tag, config, layers) = read_layout(layout);
    let (repository, chart_tag) = chart_image(section);
    assert_eq!(
        tag, chart_tag,
        "the layout's tag (the chart's {section}.tag)"
    );
    let printed = stdout_ok(
        Command::new("bash")
            .arg(repo_root().join("tests/env").join(script))
            .arg("--ref"),
    );
    assert_eq!(
        printed.trim(),
        format!("{repository}:{chart_tag}"),
        "{script} --ref"
    );
    (config, layers)
}

/// The image of a one-image layout: (its tag, its config, its layers' paths).
fn read_layout(layout: &Path) -> (String, Value, Vec<PathBuf>) {
    assert!(
        layout.join("oci-layout").is_file(),
        "{}: not an OCI layout",
        layout.display()
    );
    let index = read_json(&layout.join("index.json"));
    let manifests = index["manifests"]
        .as_array()
        .expect("index.json: manifests");
    assert_eq!(
        manifests.len(),
        1,
        "index.json: one image, got {manifests:?}"
    );
    let tag = manifests[0]["annotations"]["org.opencontainers.image.ref.name"]
        .as_str()
        .expect("index.json: a ref.name annotation (the tag)")
        .to_string();
    let manifest = read_json(&blob(layout, &manifests[0]["digest"]));
    let config = read_json(&blob(layout, &manifest["config"]["digest"]));
    let layers = manifest["layers"]
        .as_array()
        .expect("manifest: layers")
        .iter()
        .map(|l| {
            assert_eq!(
                l["mediaType"],
                "application/vnd.oci.image.layer.v1.tar+gzip"
            );
            blob(layout, &l["digest"])
        })
        .collect();
    (tag, config, layers)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// tar's verbose listing of every layer: path (no leading "./" or "/") -> (mode, owner).
fn listing(layers: &[PathBuf]) -> BTreeMap<String, (String, String)> {
    let mut files = BTreeMap::new();
    for l in layers {
        let out = stdout_ok(
            Command::new("tar")
                .args(["--numeric-owner", "-tvzf"])
                .arg(l),
        );
        for line in out.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let path = f[5..].join(" ");
            let path = path
                .trim_start_matches("./")
                .trim_start_matches('/')
                .trim_end_matches('/');
            files.insert(path.to_string(), (f[0].to_string(), f[1].to_string()));
        }
    }
    files
}

#[test]
fn the_local_image_agrees_with_the_dockerfile() {
    let df = final_stage(&std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap());
    assert_eq!(
        df.from, BASE,
        "the Dockerfile's final stage is FROM {}: tests/env/image.sh mirrors {BASE} (users, CA bundle, \
         Env, WorkingDir); teach it the new base, then this test",
        df.from
    );
    assert!(
        df.other.is_empty(),
        "instructions in the Dockerfile's final stage that tests/env/image.sh does not mirror: {:?}",
        df.other
    );
    assert!(
        df.copies.len() == 1 && df.copies[0].len() == 2,
        "the final stage copies one file, the binary: {:?}",
        df.copies
    );
    let (copy_src, binary) = (&df.copies[0][0], &df.copies[0][1]);
    assert!(
        copy_src.ends_with("/target/release/kiln"),
        "the Dockerfile copies {copy_src}, not the release binary image.sh packages"
    );

    let dir = scratch("agree");
    let layout = dir.join("kiln");
    let out = image_sh(&layout, None);
    let (config, layers) = built_layout("image.sh", &out, &layout, "image");

    let c = &config["config"];
    assert_eq!(config["os"], "linux");
    assert_eq!(
        c["User"].as_str(),
        df.user.as_deref(),
        "User (Dockerfile USER)"
    );
    assert_eq!(
        Some(strings(&c["Entrypoint"])),
        df.entrypoint,
        "Entrypoint (Dockerfile ENTRYPOINT)"
    );
    assert_eq!(Some(strings(&c["Cmd"])), df.cmd, "Cmd (Dockerfile CMD)");
    let exposed: BTreeSet<String> = c["ExposedPorts"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    assert_eq!(exposed, df.expose, "ExposedPorts (Dockerfile EXPOSE)");
    let labels: BTreeMap<String, String> = c["Labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(labels, df.labels, "Labels (Dockerfile LABEL)");
    assert_eq!(strings(&c["Env"]), BASE_ENV, "Env (as {BASE} sets it)");
    assert_eq!(
        c["WorkingDir"], BASE_WORKDIR,
        "WorkingDir (as {BASE} sets it)"
    );
    // The metrics/probe port the chart uses is the one the image exposes.
    assert!(
        df.expose.contains("8080/tcp"),
        "EXPOSE 8080 (the chart's metrics port)"
    );

    // Files: the binary where the Dockerfile copies it and the entrypoint runs it,
    // the CA bundle, the user, /tmp, the nonroot home.
    assert_eq!(
        df.entrypoint.as_deref().and_then(|e| e.first()),
        Some(binary),
        "the entrypoint runs the copied binary"
    );
    let files = listing(&layers);
    let rel = |p: &str| p.trim_start_matches('/').to_string();
    let (mode, owner) = files
        .get(&rel(binary))
        .unwrap_or_else(|| panic!("no {binary} in the image: {:?}", files.keys()));
    assert!(mode.starts_with("-rwxr-xr-x"), "{binary}: mode {mode}");
    assert_eq!(owner, "0/0", "{binary}: owner");
    assert!(
        files.contains_key(CA_BUNDLE),
        "no /{CA_BUNDLE} in the image"
    );
    assert_eq!(files["tmp"].0, "drwxrwxrwt", "/tmp");
    assert_eq!(
        files["home/nonroot"].1, "65532/65532",
        "/home/nonroot's owner"
    );

    let root = dir.join("rootfs");
    std::fs::create_dir_all(&root).unwrap();
    for l in &layers {
        stdout_ok(
            Command::new("tar")
                .args(["--no-same-owner", "--no-same-permissions", "-xzf"])
                .arg(l)
                .arg("-C")
                .arg(&root),
        );
    }
    let ca = std::fs::read_to_string(root.join(CA_BUNDLE)).unwrap();
    assert!(
        ca.matches("BEGIN CERTIFICATE").count() > 50,
        "the CA bundle holds few certificates"
    );
    let user = df.user.clone().unwrap_or_default();
    let (uid, gid) = user.split_once(':').unwrap_or((&user, ""));
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    assert!(
        passwd.lines().any(|l| l.split(':').nth(2) == Some(uid)),
        "USER {user}: uid {uid} is not in the image's /etc/passwd:\n{passwd}"
    );
    if !gid.is_empty() {
        let group = std::fs::read_to_string(root.join("etc/group")).unwrap();
        assert!(
            group.lines().any(|l| l.split(':').nth(2) == Some(gid)),
            "USER {user}: gid {gid} is not in the image's /etc/group:\n{group}"
        );
    }

    // It runs with the image's C library alone: chrooted as root; otherwise
    // through the image's dynamic loader, told to look in the image's lib dir first.
    let euid = stdout_ok(Command::new("id").arg("-u"));
    let version = if euid.trim() == "0" {
        stdout_ok(
            Command::new("chroot")
                .arg(&root)
                .arg(binary)
                .arg("--version"),
        )
    } else {
        stdout_ok(
            Command::new(root.join("lib64/ld-linux-x86-64.so.2"))
                .args(["--inhibit-cache", "--library-path"])
                .arg(root.join("lib/x86_64-linux-gnu"))
                .arg(root.join(rel(binary)))
                .arg("--version"),
        )
    };
    assert_eq!(
        version.trim(),
        format!("kiln {}", env!("CARGO_PKG_VERSION"))
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// image.sh follows what it reads from the Dockerfile and refuses what it cannot
/// mirror, so the two cannot silently drift.
#[test]
fn image_sh_follows_the_dockerfile_and_refuses_what_it_cannot_mirror() {
    let original = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    let dir = scratch("drift");
    let variant = |name: &str, edit: &dyn Fn(&str) -> String| -> (Output, PathBuf) {
        let df = dir.join(format!("Dockerfile.{name}"));
        let text = edit(&original);
        assert_ne!(text, original, "variant {name} changes nothing");
        std::fs::write(&df, text).unwrap();
        let layout = dir.join(name);
        (image_sh(&layout, Some(&df)), layout)
    };

    // Followed: CMD, USER, EXPOSE and LABEL come from the Dockerfile.
    let (out, layout) = variant("followed", &|d: &str| {
        d.replace(r#"CMD ["run"]"#, r#"CMD ["run", "--help"]"#)
            .replace("EXPOSE 8080", "EXPOSE 8080 9090/udp")
            .replace("USER 65532:65532", "USER 65534:65534")
            .replace(
                "LABEL org.opencontainers.image.title=\"kiln\"",
                "LABEL org.opencontainers.image.title=\"kiln test\" extra=\"a b\"",
            )
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, config, _) = read_layout(&layout);
    assert_eq!(strings(&config["config"]["Cmd"]), ["run", "--help"]);
    assert_eq!(config["config"]["User"], "65534:65534");
    assert!(config["config"]["ExposedPorts"]["9090/udp"].is_object());
    assert_eq!(config["config"]["Labels"]["extra"], "a b");
    assert_eq!(
        config["config"]["Labels"]["org.opencontainers.image.title"],
        "kiln test"
    );

    // Refused, naming what it cannot mirror.
    type Edit<'a> = &'a dyn Fn(&str) -> String;
    let refused: &[(&str, Edit, &str)] = &[
        (
            "env",
            &|d: &str| d.replace("USER 65532:65532", "USER 65532:65532\nENV RUST_LOG=debug"),
            "ENV in the final stage",
        ),
        (
            "run",
            &|d: &str| {
                d.replace(
                    "USER 65532:65532",
                    "RUN [\"/usr/local/bin/kiln\", \"--version\"]\nUSER 65532:65532",
                )
            },
            "RUN in the final stage",
        ),
        (
            "base",
            &|d: &str| d.replace("cc-debian12:nonroot", "static-debian12:nonroot"),
            "mirrors gcr.io/distroless/cc-debian12:nonroot only",
        ),
        (
            "shell-form",
            &|d: &str| {
                d.replace(
                    r#"ENTRYPOINT ["/usr/local/bin/kiln"]"#,
                    "ENTRYPOINT /usr/local/bin/kiln",
                )
            },
            "only the exec (JSON array) form",
        ),
        (
            "chown",
            &|d: &str| d.replace("COPY --from=build", "COPY --chown=1:1 --from=build"),
            "only COPY --from=STAGE SRC DST",
        ),
        (
            "two-copies",
            &|d: &str| {
                d.replace(
                    "USER 65532:65532",
                    "COPY --from=build /src/Cargo.toml /Cargo.toml\nUSER 65532:65532",
                )
            },
            "exactly one file",
        ),
        (
            "not-release",
            &|d: &str| {
                d.replace(
                    "/src/target/release/kiln /usr",
                    "/src/target/debug/kiln /usr",
                )
            },
            "not the release binary",
        ),
    ];
    for (name, edit, why) in refused {
        let (out, layout) = variant(name, edit);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "variant {name}: image.sh accepted it"
        );
        assert!(
            stderr.contains(why),
            "variant {name}: want {why:?} in:\n{stderr}"
        );
        assert!(!layout.exists(), "variant {name}: a layout was written");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_dockerfile_parser_here_reads_labels_and_continuations() {
    let s = final_stage(
        "FROM a AS build\nRUN x\n# c\nFROM b:1\nLABEL k=\"v w\" \\\n  # inside\n  j='x y' z=1\nEXPOSE 80 53/udp\nUSER 1:2\n",
    );
    assert_eq!(s.from, "b:1");
    assert_eq!(s.labels["k"], "v w");
    assert_eq!(s.labels["j"], "x y");
    assert_eq!(s.labels["z"], "1");
    assert_eq!(s.expose, BTreeSet::from(["80/tcp".into(), "53/udp".into()]));
    assert_eq!(s.user.as_deref(), Some("1:2"));
    assert!(s.other.is_empty());
}

// ------------------------------------------------------------------ the runner image

/// Dockerfile.runner's final base, and the Env it starts from (debian:12-slim's).
const RUNNER_BASE: &str = "docker.io/library/debian:12-slim";
const RUNNER_BASE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Where the runner image's virtualenv is, in both builds.
const VENV: &str = "/opt/ansible";

/// `tests/env/runner-image.sh ARGS...`.
fn runner_image_sh(args: &[&str], extra: &[&Path]) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("tests/env/runner-image.sh"))
        .args(args)
        .args(extra);
    run(&mut cmd)
}

/// The words of each `WORD ...` instruction among a stage's other instructions.
fn instructions(stage: &Stage, word: &str) -> Vec<Vec<String>> {
    stage
        .other
        .iter()
        .filter_map(|ins| {
            let (w, rest) = ins.split_once(char::is_whitespace)?;
            w.eq_ignore_ascii_case(word).then(|| shell_words(rest))
        })
        .collect()
}

/// The runner image made without Docker (`tests/env/runner-image.sh`: this Debian
/// machine's python3.11, ssh, git and busybox, ansible-core from PyPI wheels) agrees
/// with Dockerfile.runner: the chart's default runner reference, User, WorkingDir,
/// Env (debian:12-slim's PATH, then the ENV instructions), Cmd, Labels, ansible-core
/// at the Dockerfile's ARG, the files the runner Pods need; and, as root, the tools
/// run chrooted as the image's user. The layout is kept under cargo's target dir
/// and rebuilt only when its inputs change (`--cached`): ~5 s, then ~0.1 s.
#[test]
fn the_local_runner_image_agrees_with_dockerfile_runner() {
    let text = std::fs::read_to_string(repo_root().join("Dockerfile.runner")).unwrap();
    let df = final_stage(&text);
    assert_eq!(df.from, RUNNER_BASE, "Dockerfile.runner's final base");
    let unknown: Vec<&String> = df
        .other
        .iter()
        .filter(|i| {
            let w = i.split_whitespace().next().unwrap_or_default();
            !["RUN", "ENV", "WORKDIR", "ARG"].contains(&w.to_ascii_uppercase().as_str())
        })
        .collect();
    assert!(
        unknown.is_empty(),
        "instructions in Dockerfile.runner's final stage that runner-image.sh does not mirror: {unknown:?}"
    );
    assert_eq!(
        df.copies,
        [[VENV.to_string(), VENV.to_string()]],
        "the final stage copies the virtualenv from the build stage, nothing else"
    );
    assert!(df.expose.is_empty(), "EXPOSE: {:?}", df.expose);
    let version = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("ARG ANSIBLE_CORE_VERSION="))
        .expect("Dockerfile.runner: ARG ANSIBLE_CORE_VERSION=...")
        .trim_matches('"')
        .to_string();
    // Env as Docker makes it: the base's PATH, then each ENV in order (a key set
    // again keeps its place).
    let mut want_env: Vec<(String, String)> = vec![("PATH".into(), RUNNER_BASE_PATH.into())];
    for words in instructions(&df, "ENV") {
        for w in words {
            let (k, v) = w
                .split_once('=')
                .unwrap_or_else(|| panic!("ENV {w}: want KEY=VALUE"));
            match want_env.iter_mut().find(|(ek, _)| ek == k) {
                Some(e) => e.1 = v.to_string(),
                None => want_env.push((k.to_string(), v.to_string())),
            }
        }
    }
    let want_env: Vec<String> = want_env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let workdir = instructions(&df, "WORKDIR")
        .pop()
        .map(|w| w.join(" "))
        .unwrap_or_else(|| "/".into());

    let layout = Path::new(env!("CARGO_TARGET_TMPDIR")).join("runner-image/kiln-runner");
    let out = runner_image_sh(&["--cached", "--no-import", "--layout"], &[&layout]);
    let (config, layers) = built_layout("runner-image.sh", &out, &layout, "runner");

    let c = &config["config"];
    assert_eq!(config["os"], "linux");
    assert_eq!(c["User"].as_str(), df.user.as_deref(), "User (USER)");
    assert_eq!(
        c["WorkingDir"].as_str(),
        Some(workdir.as_str()),
        "WorkingDir (WORKDIR)"
    );
    assert_eq!(
        strings(&c["Env"]),
        want_env,
        "Env (debian:12-slim's PATH, then ENV)"
    );
    assert_eq!(
        strings(&c["Cmd"]),
        df.cmd.clone().unwrap_or_default(),
        "Cmd (CMD)"
    );
    assert_eq!(
        strings(&c["Entrypoint"]),
        df.entrypoint.clone().unwrap_or_default(),
        "Entrypoint (ENTRYPOINT)"
    );
    let labels: BTreeMap<String, String> = c["Labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(labels, df.labels, "Labels (LABEL)");

    // What runner Pods (read-only root, an emptyDir at /tmp) rely on.
    let env: BTreeMap<&str, &str> = want_env
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .collect();
    assert_eq!(env.get("HOME"), Some(&"/tmp"), "HOME");
    assert!(
        env["PATH"].split(':').next() == Some("/opt/ansible/bin"),
        "ansible's bin first on PATH: {}",
        env["PATH"]
    );
    for k in ["ANSIBLE_HOME", "ANSIBLE_LOCAL_TEMP"] {
        assert!(
            env.get(k).is_some_and(|v| v.starts_with("/tmp/")),
            "{k} under /tmp: {env:?}"
        );
    }
    assert_eq!(env.get("PYTHONDONTWRITEBYTECODE"), Some(&"1"));
    assert!(
        env.get("LANG").is_some_and(|v| v.ends_with("UTF-8")),
        "a UTF-8 LANG: {env:?}"
    );
    assert!(
        !env.contains_key("ANSIBLE_HOST_KEY_CHECKING"),
        "host key checking stays on (kiln passes known_hosts)"
    );

    // Paths without tar's " -> TARGET" (symlinks) and " link to TARGET" (hard links).
    let files: BTreeMap<String, (String, String)> = listing(&layers)
        .into_iter()
        .map(|(k, v)| {
            let name = k.split(" -> ").next().unwrap_or_default();
            let name = name.split(" link to ").next().unwrap_or_default();
            (name.to_string(), v)
        })
        .collect();
    for f in [
        "usr/bin/sh",
        "usr/bin/busybox",
        "usr/bin/python3.11",
        "usr/bin/ssh",
        "usr/bin/git",
        "usr/lib/git-core/git-remote-http",
        "usr/lib/git-core/git-remote-https",
        "usr/lib/locale/C.utf8/LC_CTYPE",
        "opt/ansible/bin/ansible-playbook",
        "opt/ansible/pyvenv.cfg",
        "etc/nsswitch.conf",
        CA_BUNDLE,
    ] {
        assert!(files.contains_key(f), "no /{f} in the runner image");
    }
    for (link, to) in [
        ("bin", "usr/bin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        assert!(
            files
                .get(link)
                .is_some_and(|(mode, _)| mode.starts_with('l')),
            "/{link} is not a symlink (to {to}, merged /usr)"
        );
    }
    assert_eq!(files["tmp"].0, "drwxrwxrwt", "/tmp");
    let dist_info =
        format!("opt/ansible/lib/python3.11/site-packages/ansible_core-{version}.dist-info");
    assert!(
        files.contains_key(&dist_info),
        "ansible-core {version} (Dockerfile.runner's ARG) is not in the image: no /{dist_info}"
    );

    let dir = scratch("runner");
    let root = dir.join("rootfs");
    std::fs::create_dir_all(&root).unwrap();
    for l in &layers {
        stdout_ok(Command::new("tar").arg("-xzf").arg(l).arg("-C").arg(&root));
    }
    let user = df.user.clone().unwrap_or_default();
    let (uid, gid) = user.split_once(':').unwrap_or((&user, &user));
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    assert!(
        passwd.lines().any(|l| {
            let f: Vec<&str> = l.split(':').collect();
            f.get(2) == Some(&uid) && f.get(5) == Some(&"/tmp")
        }),
        "USER {user}: no passwd entry for uid {uid} with home /tmp (ssh reads ~/.ssh from it):\n{passwd}"
    );
    let group = std::fs::read_to_string(root.join("etc/group")).unwrap();
    assert!(
        group.lines().any(|l| l.split(':').nth(2) == Some(gid)),
        "USER {user}: gid {gid} is not in the image's /etc/group:\n{group}"
    );

    // The tools run, as the image's user, with the image's files and Env alone.
    if stdout_ok(Command::new("id").arg("-u")).trim() == "0" {
        // The container runtime provides /dev/null (git and ssh open it).
        std::fs::create_dir_all(root.join("dev")).unwrap();
        stdout_ok(
            Command::new("mknod")
                .args(["-m", "666"])
                .arg(root.join("dev/null"))
                .args(["c", "1", "3"]),
        );
        let out = run(Command::new("chroot")
            .arg(format!("--userspec={uid}:{gid}"))
            .arg(&root)
            .args([
                "/bin/sh",
                "-c",
                "cd /tmp && ansible-playbook --version && git --version && ssh -V 2>&1 \
                 && python3 -c 'import ssl, ctypes, sqlite3, lzma, bz2, uuid, locale; print(\"encoding\", locale.getpreferredencoding())' \
                 && git ls-remote https://127.0.0.1:1/none.git 2>&1 | head -1",
            ])
            .env_clear()
            .envs(env.iter().map(|(k, v)| (*k, *v))));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "the tools in the runner image:\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for want in [
            format!("ansible-playbook [core {version}]"),
            "python version = 3.11".into(),
            "git version ".into(),
            "OpenSSH_".into(),
            "encoding UTF-8".into(),
            // git's https helper runs (its libraries are there); nothing listens.
            "unable to access 'https://127.0.0.1:1/none.git/'".into(),
        ] {
            assert!(stdout.contains(&want), "no {want:?} in:\n{stdout}");
        }
    } else {
        eprintln!("not root: the runner image's tools are not run (chroot)");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// runner-image.sh refuses what it cannot mirror from Dockerfile.runner (before
/// building anything).
#[test]
fn runner_image_sh_refuses_what_it_cannot_mirror() {
    let original = std::fs::read_to_string(repo_root().join("Dockerfile.runner")).unwrap();
    let dir = scratch("runner-drift");
    type Edit<'a> = &'a dyn Fn(&str) -> String;
    let refused: &[(&str, Edit, &str)] = &[
        (
            "package",
            &|d: &str| d.replace("openssh-client git", "openssh-client git curl"),
            "installs curl",
        ),
        (
            "env-reference",
            &|d: &str| d.replace("USER 65532:65532", "ENV X=$HOME/x\nUSER 65532:65532"),
            "no variable references",
        ),
        (
            "expose",
            &|d: &str| d.replace("USER 65532:65532", "EXPOSE 80\nUSER 65532:65532"),
            "EXPOSE in the final stage",
        ),
        (
            "base",
            &|d: &str| d.replace("debian:12-slim\nRUN", "debian:13-slim\nRUN"),
            "mirrors docker.io/library/debian:12-slim only",
        ),
        (
            "no-cmd",
            &|d: &str| d.replace("CMD [\"/bin/sh\"]", ""),
            "no CMD or ENTRYPOINT",
        ),
    ];
    for (name, edit, why) in refused {
        let text = edit(&original);
        assert_ne!(text, original, "variant {name} changes nothing");
        let df = dir.join(format!("Dockerfile.runner.{name}"));
        std::fs::write(&df, text).unwrap();
        let layout = dir.join(name);
        let out = runner_image_sh(
            &["--no-import", "--dockerfile"],
            &[&df, Path::new("--layout"), &layout],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "variant {name}: runner-image.sh accepted it"
        );
        assert!(
            stderr.contains(why),
            "variant {name}: want {why:?} in:\n{stderr}"
        );
        assert!(!layout.exists(), "variant {name}: a layout was written");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
