//! Integration tests against a real OpenSSH sshd started per test on a
//! loopback port (needs root and `openssh-server`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

mod common;

use common::free_port;
use kiln::communicator::pool::SessionPool;
use kiln::communicator::ssh::{self, HostKeyPolicy, OutputStream, SecretString, SshError, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const SSHD: &str = "/usr/sbin/sshd";

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "kiln=debug".into()),
        )
        .with_test_writer()
        .try_init();
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Key material shared by all tests (generated once per test binary).
struct Keys {
    dir: PathBuf,
}

impl Keys {
    fn get() -> &'static Keys {
        static KEYS: OnceLock<Keys> = OnceLock::new();
        KEYS.get_or_init(|| {
            let dir = PathBuf::from(format!("/tmp/sshdev/run/keys-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("mkdir");
            let keygen = |name: &str, args: &[&str]| {
                run(Command::new("ssh-keygen")
                    .args(["-q", "-N", "", "-C", name, "-f"])
                    .arg(dir.join(name))
                    .args(args));
            };
            keygen("host_ed25519", &["-t", "ed25519"]);
            keygen("host_rsa", &["-t", "rsa", "-b", "2048"]);
            keygen("other_host", &["-t", "ed25519"]);
            keygen("client_ed25519", &["-t", "ed25519"]);
            keygen("client_ecdsa", &["-t", "ecdsa", "-b", "256"]);
            keygen("client_rsa_pem", &["-t", "rsa", "-b", "2048", "-m", "PEM"]);
            keygen(
                "client_rsa_pkcs8",
                &["-t", "rsa", "-b", "2048", "-m", "PKCS8"],
            );
            keygen("unauthorized", &["-t", "ed25519"]);
            let mut authorized = String::new();
            for k in [
                "client_ed25519",
                "client_ecdsa",
                "client_rsa_pem",
                "client_rsa_pkcs8",
            ] {
                authorized += &std::fs::read_to_string(dir.join(format!("{k}.pub"))).expect("pub");
            }
            std::fs::write(dir.join("authorized_keys"), authorized).expect("write");
            Keys { dir }
        })
    }

    fn private(&self, name: &str) -> SecretString {
        SecretString::new(std::fs::read_to_string(self.dir.join(name)).expect("read key"))
    }

    /// `type base64` of a public key.
    fn public(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join(format!("{name}.pub"))).expect("pub");
        text.split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn fingerprint(&self, name: &str) -> String {
        let out = Command::new("ssh-keygen")
            .arg("-lf")
            .arg(self.dir.join(format!("{name}.pub")))
            .output()
            .expect("ssh-keygen -l");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1)
            .expect("fingerprint")
            .to_owned()
    }
}

struct Sshd {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Sshd {
    fn start(name: &str) -> Sshd {
        Self::start_on(name, free_port())
    }

    fn start_on(name: &str, port: u16) -> Sshd {
        let keys = Keys::get();
        std::fs::create_dir_all("/run/sshd").expect("privsep dir");
        let dir = PathBuf::from(format!("/tmp/sshdev/run/{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let config = format!(
            "HostKey {k}/host_ed25519\n\
             HostKey {k}/host_rsa\n\
             AuthorizedKeysFile {k}/authorized_keys\n\
             UsePAM no\n\
             StrictModes no\n\
             PermitRootLogin prohibit-password\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             PidFile none\n\
             LogLevel DEBUG1\n\
             Subsystem sftp /usr/lib/openssh/sftp-server\n",
            k = keys.dir.display()
        );
        let config_path = dir.join("sshd_config");
        std::fs::write(&config_path, config).expect("config");
        let child = Command::new(SSHD)
            // -E (not -e): with -e, debug lines of the session child end up
            // in the channel's stderr.
            .arg("-D")
            .arg("-E")
            .arg(dir.join("sshd.log"))
            .arg("-f")
            .arg(&config_path)
            .args(["-p", &port.to_string(), "-o", "ListenAddress=127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sshd");
        let sshd = Sshd { child, port, dir };
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < until, "sshd did not start: {}", sshd.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        sshd
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }

    fn known_hosts(&self) -> String {
        format!(
            "# test\n[127.0.0.1]:{} {}\n",
            self.port,
            Keys::get().public("host_ed25519")
        )
    }

    fn target(&self) -> Target {
        let mut t = Target::new(
            "127.0.0.1",
            self.port,
            "root",
            Keys::get().private("client_ed25519"),
            HostKeyPolicy::KnownHosts(self.known_hosts()),
        );
        t.connect_timeout = Duration::from_secs(5);
        t.keepalive = Duration::from_secs(2);
        t
    }

    /// Per-connection sshd processes (children of the listener).
    fn connection_pids(&self) -> Vec<u32> {
        let out = Command::new("ps")
            .args(["-o", "pid=", "--ppid", &self.child.id().to_string()])
            .output()
            .expect("ps");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An output chunk with the time it arrived after the command started.
type Chunk = (Duration, OutputStream, Vec<u8>);

#[derive(Default, Clone)]
struct Captured {
    out: Arc<Mutex<Vec<Chunk>>>,
}

impl Captured {
    fn sink(&self) -> impl FnMut(OutputStream, &[u8]) + Send + use<> {
        let out = self.out.clone();
        let start = Instant::now();
        move |stream, data| {
            out.lock()
                .expect("lock")
                .push((start.elapsed(), stream, data.to_vec()))
        }
    }
    fn text(&self, which: OutputStream) -> String {
        let out = self.out.lock().expect("lock");
        let bytes: Vec<u8> = out
            .iter()
            .filter(|(_, s, _)| *s == which)
            .flat_map(|(_, _, d)| d.clone())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

async fn run_ok(session: &ssh::Session, command: &str) -> (u32, String) {
    let cap = Captured::default();
    let r = session
        .exec(command, cap.sink(), &CancellationToken::new())
        .await
        .expect("exec");
    (
        r.exit_code.expect("exit code"),
        cap.text(OutputStream::Stdout),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_exit_codes_streams_and_signals() {
    init_tracing();
    let sshd = Sshd::start("exec");
    let session = ssh::connect(&sshd.target(), &CancellationToken::new())
        .await
        .expect("connect");
    let cancel = CancellationToken::new();

    let cap = Captured::default();
    let r = session
        .exec("echo out1; echo err1 >&2; exit 3", cap.sink(), &cancel)
        .await
        .expect("exec");
    assert_eq!(r.exit_code, Some(3));
    assert_eq!(r.exit_signal, None);
    assert_eq!(cap.text(OutputStream::Stdout), "out1\n");
    assert_eq!(cap.text(OutputStream::Stderr), "err1\n");

    let r = session
        .exec("true", |_, _| {}, &cancel)
        .await
        .expect("exec");
    assert_eq!(r.exit_code, Some(0));
    assert!(r.success());

    // Output is streamed: the first chunk arrives well before the command ends.
    let cap = Captured::default();
    let r = session
        .exec("echo first; sleep 3; echo second >&2", cap.sink(), &cancel)
        .await
        .expect("exec");
    assert_eq!(r.exit_code, Some(0));
    {
        let chunks = cap.out.lock().expect("lock");
        assert_eq!(
            chunks.first().map(|c| c.2.as_slice()),
            Some(&b"first\n"[..])
        );
        // Streamed: the first line arrives well before the command ends.
        assert!(
            chunks[0].0 < Duration::from_millis(2000),
            "{:?}",
            chunks[0].0
        );
        let last = chunks.last().expect("last");
        assert_eq!(last.1, OutputStream::Stderr);
        assert!(last.0 >= Duration::from_millis(2900), "{:?}", last.0);
    }

    // stdin is closed: a command reading it gets EOF instead of hanging.
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        session.exec("cat; read x || echo eof", cap.sink(), &cancel),
    )
    .await
    .expect("stdin reader must not hang")
    .expect("exec");
    assert_eq!(r.exit_code, Some(0));
    assert!(cap.text(OutputStream::Stdout).ends_with("eof\n"));

    let r = session
        .exec("kill -USR1 $$", |_, _| {}, &cancel)
        .await
        .expect("exec");
    assert_eq!(r.exit_code, None);
    assert_eq!(r.exit_signal.as_deref(), Some("USR1"));

    // Large output is delivered completely and in order.
    let cap = Captured::default();
    let r = session
        .exec("seq 1 200000", cap.sink(), &cancel)
        .await
        .expect("exec");
    assert_eq!(r.exit_code, Some(0));
    let text = cap.text(OutputStream::Stdout);
    assert_eq!(text.lines().count(), 200000);
    assert_eq!(text.lines().last(), Some("200000"));

    session.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_sets_content_and_mode() {
    init_tracing();
    let sshd = Sshd::start("upload");
    let session = ssh::connect(&sshd.target(), &CancellationToken::new())
        .await
        .expect("connect");
    let path = sshd.dir.join("uploaded.txt");
    let p = path.to_str().expect("utf8");

    session
        .upload(p, b"hello kiln\n", 0o640)
        .await
        .expect("upload");
    assert_eq!(std::fs::read(&path).expect("read"), b"hello kiln\n");
    let (code, out) = run_ok(&session, &format!("stat -c %a {p}")).await;
    assert_eq!((code, out.trim()), (0, "640"));

    // Existing, more permissive file: truncated and mode tightened.
    std::fs::write(&path, vec![b'x'; 10_000]).expect("write");
    run_ok(&session, &format!("chmod 777 {p}")).await;
    session.upload(p, b"short", 0o600).await.expect("upload");
    assert_eq!(std::fs::read(&path).expect("read"), b"short");
    let (_, out) = run_ok(&session, &format!("stat -c %a {p}")).await;
    assert_eq!(out.trim(), "600");

    // Executable script, 3 MiB of binary content.
    let big: Vec<u8> = (0..3 * 1024 * 1024u32)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let big_path = sshd.dir.join("big.bin");
    let bp = big_path.to_str().expect("utf8");
    session.upload(bp, &big, 0o755).await.expect("upload big");
    assert_eq!(std::fs::read(&big_path).expect("read"), big);
    let (_, out) = run_ok(&session, &format!("stat -c %a {bp}")).await;
    assert_eq!(out.trim(), "755");

    // Empty file.
    session.upload(bp, b"", 0o644).await.expect("upload empty");
    assert_eq!(std::fs::read(&big_path).expect("read").len(), 0);

    // Errors name the path.
    let missing = "/nonexistent-dir/x/file.txt";
    let err = session
        .upload(missing, b"data", 0o644)
        .await
        .expect_err("must fail");
    assert!(
        matches!(err, SshError::Sftp { ref path, .. } if path == missing),
        "{err:?}"
    );
    assert!(err.to_string().contains(missing), "{err}");
    println!("upload error: {err}");

    // Session still usable afterwards.
    assert_eq!(run_ok(&session, "echo ok").await.1, "ok\n");
    session.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_remote_process() {
    init_tracing();
    let sshd = Sshd::start("cancel");
    let session = Arc::new(
        ssh::connect(&sshd.target(), &CancellationToken::new())
            .await
            .expect("connect"),
    );
    let marker = sshd.dir.join("marker");
    let marker_ignoring = sshd.dir.join("marker-ignoring-term");

    // Plain command: TERM reaches the whole process group.
    let cancel = CancellationToken::new();
    let cmd = format!("echo started; sleep 4.25; touch {}", marker.display());
    let s = session.clone();
    let c = cancel.clone();
    let cap = Captured::default();
    let sink = cap.sink();
    let task = tokio::spawn(async move { s.exec(&cmd, sink, &c).await });
    // Poll rather than sleep a fixed time: under load the start can lag.
    let until = Instant::now() + Duration::from_secs(3);
    while cap.text(OutputStream::Stdout) != "started\n" {
        assert!(Instant::now() < until, "command did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t0 = Instant::now();
    cancel.cancel();
    let res = task.await.expect("join");
    assert!(matches!(res, Err(SshError::Cancelled)), "{res:?}");
    assert!(
        // Under TERM_GRACE (2 s): the TERM ended it, not the KILL that follows.
        t0.elapsed() < Duration::from_millis(1900),
        "TERM should end it quickly: {:?}",
        t0.elapsed()
    );

    // A command that ignores TERM is killed with KILL after the grace period.
    let cancel = CancellationToken::new();
    let cmd = format!(
        "trap '' TERM; echo started; sleep 4.5; touch {}",
        marker_ignoring.display()
    );
    let s = session.clone();
    let c = cancel.clone();
    let task = tokio::spawn(async move { s.exec(&cmd, |_, _| {}, &c).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    cancel.cancel();
    let res = task.await.expect("join");
    assert!(matches!(res, Err(SshError::Cancelled)), "{res:?}");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(4),
        "{took:?}"
    );

    // Cancels racing the start of the command (before or while its PID
    // marker arrives) must stop it too.
    let mut racing_markers = Vec::new();
    for delay_ms in [0u64, 5, 15, 30, 60, 120] {
        let m = sshd.dir.join(format!("marker-race-{delay_ms}"));
        let cancel = CancellationToken::new();
        let s = session.clone();
        let c = cancel.clone();
        let cmd = format!("sleep 4.5; touch {}", m.display());
        racing_markers.push(m);
        let task = tokio::spawn(async move { s.exec(&cmd, |_, _| {}, &c).await });
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        cancel.cancel();
        let res = task.await.expect("join");
        assert!(
            matches!(res, Err(SshError::Cancelled)),
            "{delay_ms}ms: {res:?}"
        );
    }

    // No sleeper left, and the session still works.
    let (_, out) = run_ok(&session, "ps -eo args | grep -c '^sleep 4\\.[25]' || true").await;
    assert_eq!(out.trim(), "0", "remote sleep still running");

    // Past the time the commands would have finished: no marker appeared.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !marker.exists(),
        "marker appeared: the remote command was not stopped"
    );
    assert!(
        !marker_ignoring.exists(),
        "marker appeared: KILL did not stop the command"
    );

    // Already-cancelled token: nothing runs.
    let cancel = CancellationToken::new();
    cancel.cancel();
    let res = session.exec("true", |_, _| {}, &cancel).await;
    assert!(matches!(res, Err(SshError::Cancelled)));
    // As root, OpenSSH refuses the signal request; the kill over a second
    // channel is what stopped the commands.
    assert!(
        sshd.log()
            .contains("session signalling requires privilege separation")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supported_private_key_formats() {
    init_tracing();
    let sshd = Sshd::start("keyformats");
    for name in [
        "client_ed25519",
        "client_ecdsa",
        "client_rsa_pem",
        "client_rsa_pkcs8",
    ] {
        let mut target = sshd.target();
        target.private_key = Keys::get().private(name);
        let session = ssh::connect(&target, &CancellationToken::new())
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            run_ok(&session, "echo $USER-ok").await.1,
            "root-ok\n",
            "{name}"
        );
        session.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_hosts_variants_accepted() {
    init_tracing();
    let sshd = Sshd::start("knownhosts");
    let keys = Keys::get();
    let port = sshd.port;
    // Only the RSA host key on record: negotiation must pick RSA.
    let rsa_only = format!("[127.0.0.1]:{port} {}\n", keys.public("host_rsa"));
    // Hashed by ssh-keygen itself.
    let hashed_file = sshd.dir.join("known_hosts_hashed");
    std::fs::write(
        &hashed_file,
        format!("[127.0.0.1]:{port} {}\n", keys.public("host_ed25519")),
    )
    .expect("write");
    run(Command::new("ssh-keygen")
        .arg("-H")
        .arg("-f")
        .arg(&hashed_file));
    let hashed = std::fs::read_to_string(&hashed_file).expect("read");
    assert!(hashed.starts_with("|1|"), "{hashed}");
    // Pattern list plus an unrelated mismatching host.
    let patterns = format!(
        "otherhost {}\nfoo,[127.0.0.*]:{port} {}\n",
        keys.public("other_host"),
        keys.public("host_ed25519")
    );
    for (label, kh) in [
        ("rsa-only", rsa_only),
        ("hashed", hashed),
        ("patterns", patterns),
    ] {
        let mut target = sshd.target();
        target.host_key = HostKeyPolicy::KnownHosts(kh);
        let session = ssh::connect(&target, &CancellationToken::new())
            .await
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        session.close().await;
    }
    let mut target = sshd.target();
    target.host_key = HostKeyPolicy::InsecureIgnore;
    ssh::connect(&target, &CancellationToken::new())
        .await
        .expect("insecure")
        .close()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failures_return_immediately() {
    init_tracing();
    let sshd = Sshd::start("permanent");
    let keys = Keys::get();
    let cancel = CancellationToken::new();

    // Unauthorized key.
    let mut target = sshd.target();
    target.connect_timeout = Duration::from_secs(60);
    target.private_key = keys.private("unauthorized");
    let t0 = Instant::now();
    let err = ssh::connect(&target, &cancel)
        .await
        .expect_err("auth must fail");
    println!("auth: {err}");
    assert!(
        matches!(err, SshError::AuthFailed { ref user, .. } if user == "root"),
        "{err:?}"
    );
    assert!(!err.is_transient());
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(
        err.to_string(),
        format!(
            "authentication failed for user 'root' at 127.0.0.1:{}: the server rejected the private key",
            sshd.port
        )
    );

    // known_hosts has the host, with a different key.
    let mut target = sshd.target();
    target.connect_timeout = Duration::from_secs(60);
    target.host_key = HostKeyPolicy::KnownHosts(format!(
        "[127.0.0.1]:{} {}\n",
        sshd.port,
        keys.public("other_host")
    ));
    let t0 = Instant::now();
    let err = ssh::connect(&target, &cancel).await.expect_err("mismatch");
    println!("mismatch: {err}");
    match &err {
        SshError::HostKeyMismatch {
            presented_fingerprint,
            ..
        } => assert_eq!(presented_fingerprint, &keys.fingerprint("host_ed25519")),
        other => panic!("{other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(5));

    // known_hosts without this host (the same key under another port/name).
    let mut target = sshd.target();
    target.connect_timeout = Duration::from_secs(60);
    target.host_key = HostKeyPolicy::KnownHosts(format!(
        "127.0.0.1 {}\notherhost {}\n",
        keys.public("host_ed25519"),
        keys.public("other_host")
    ));
    let err = ssh::connect(&target, &cancel).await.expect_err("unknown");
    println!("unknown: {err}");
    assert!(
        matches!(err, SshError::HostKeyUnknown { ref presented_fingerprint, .. } if presented_fingerprint.starts_with("SHA256:")),
        "{err:?}"
    );

    // Empty known_hosts never accepts.
    let mut target = sshd.target();
    target.host_key = HostKeyPolicy::KnownHosts(String::new());
    let err = ssh::connect(&target, &cancel).await.expect_err("empty");
    assert!(matches!(err, SshError::HostKeyUnknown { .. }), "{err:?}");

    // Malformed inputs are rejected before any network traffic.
    let mut target = sshd.target();
    target.host_key = HostKeyPolicy::KnownHosts("garbage-line\n".into());
    let err = ssh::connect(&target, &cancel)
        .await
        .expect_err("invalid kh");
    assert!(matches!(err, SshError::InvalidKnownHosts(_)), "{err:?}");
    let mut target = sshd.target();
    target.private_key = SecretString::new("not a key");
    let err = ssh::connect(&target, &cancel)
        .await
        .expect_err("invalid key");
    println!("invalid key: {err}");
    assert!(matches!(err, SshError::InvalidPrivateKey(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_timeouts() {
    init_tracing();
    let cancel = CancellationToken::new();
    let closed_port = free_port();
    let mut target = Target::new(
        "127.0.0.1",
        closed_port,
        "root",
        Keys::get().private("client_ed25519"),
        HostKeyPolicy::InsecureIgnore,
    );
    target.connect_timeout = Duration::from_millis(1500);

    let err = ssh::connect_once(&target, &cancel)
        .await
        .expect_err("refused");
    println!("refused: {err}");
    assert!(matches!(err, SshError::Refused { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("connection refused by 127.0.0.1:{closed_port}")
    );
    assert!(err.is_transient());

    let t0 = Instant::now();
    let err = ssh::connect(&target, &cancel).await.expect_err("timeout");
    println!("timeout(refused): {err}");
    match &err {
        SshError::Timeout { after, last, .. } => {
            assert!(
                // Upper bounds leave room for a loaded CI machine; what matters is that the
                // retry loop stops near the timeout instead of running on.
                *after >= Duration::from_millis(700) && *after <= Duration::from_millis(3000),
                "{after:?}"
            );
            assert!(last.contains("connection refused"), "{last}");
        }
        other => panic!("{other:?}"),
    }
    assert!(t0.elapsed() <= Duration::from_millis(3500));

    // A server that accepts TCP but never speaks SSH (hung sshd / blackhole).
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let silent_port = silent.local_addr().expect("addr").port();
    let held = Arc::new(Mutex::new(Vec::new()));
    let h = held.clone();
    let accept_silent = tokio::spawn(async move {
        while let Ok((sock, _)) = silent.accept().await {
            h.lock().expect("lock").push(sock);
        }
    });
    let mut target_silent = target.clone();
    target_silent.port = silent_port;
    let t0 = Instant::now();
    let err = ssh::connect(&target_silent, &cancel)
        .await
        .expect_err("timeout");
    println!("timeout(silent): {err}");
    assert!(
        matches!(&err, SshError::Timeout { last, .. } if last.contains("timed out")),
        "{err:?}"
    );
    assert!(
        t0.elapsed() < Duration::from_millis(4000),
        "{:?}",
        t0.elapsed()
    );
    accept_silent.abort();

    // A server that accepts and immediately closes (sshd not ready): transient.
    let closing = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let closing_port = closing.local_addr().expect("addr").port();
    let accept_close = tokio::spawn(async move {
        while let Ok((sock, _)) = closing.accept().await {
            drop(sock);
        }
    });
    let mut target_closing = target.clone();
    target_closing.port = closing_port;
    let err = ssh::connect_once(&target_closing, &cancel)
        .await
        .expect_err("closed");
    println!("closing: {err}");
    assert!(matches!(err, SshError::Handshake { .. }), "{err:?}");
    assert!(err.is_transient());
    accept_close.abort();

    // Cancellation ends the retry loop promptly.
    let mut target_long = target.clone();
    target_long.connect_timeout = Duration::from_secs(60);
    let c = CancellationToken::new();
    let c2 = c.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(600)).await;
        c2.cancel();
    });
    let t0 = Instant::now();
    let err = ssh::connect(&target_long, &c).await.expect_err("cancelled");
    assert!(matches!(err, SshError::Cancelled), "{err:?}");
    assert!(
        t0.elapsed() < Duration::from_millis(3000),
        "{:?}",
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_retries_until_sshd_comes_up() {
    init_tracing();
    let keys = Keys::get(); // generate before the clock starts
    let port = free_port();
    let sshd_slot: Arc<Mutex<Option<Sshd>>> = Arc::default();
    let slot = sshd_slot.clone();
    let starter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        *slot.lock().expect("lock") = Some(Sshd::start_on("late", port));
    });
    let mut target = Target::new(
        "127.0.0.1",
        port,
        "root",
        keys.private("client_ed25519"),
        HostKeyPolicy::KnownHosts(format!(
            "[127.0.0.1]:{port} {}\n",
            keys.public("host_ed25519")
        )),
    );
    target.connect_timeout = Duration::from_secs(15);
    let t0 = Instant::now();
    let session = ssh::connect(&target, &CancellationToken::new())
        .await
        .expect("connect after retries");
    assert!(t0.elapsed() >= Duration::from_millis(1400));
    assert_eq!(run_ok(&session, "echo up").await.1, "up\n");
    session.close().await;
    starter.join().expect("starter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_drop_during_exec_is_disconnected() {
    init_tracing();
    let sshd = Sshd::start("drop");
    let session = Arc::new(
        ssh::connect(&sshd.target(), &CancellationToken::new())
            .await
            .expect("connect"),
    );
    let s = session.clone();
    let task = tokio::spawn(async move {
        s.exec(
            "echo running; sleep 5",
            |_, _| {},
            &CancellationToken::new(),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    let pids = sshd.connection_pids();
    assert!(!pids.is_empty());
    for pid in pids {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    let res = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("exec returns after the drop")
        .expect("join");
    println!("drop: {res:?}");
    assert!(matches!(res, Err(SshError::Disconnected(_))), "{res:?}");
    assert!(session.is_closed());
    let err = session
        .exec("true", |_, _| {}, &CancellationToken::new())
        .await
        .expect_err("closed session");
    assert!(matches!(err, SshError::Disconnected(_)), "{err:?}");
    let err = session
        .upload("/tmp/x", b"x", 0o644)
        .await
        .expect_err("closed");
    assert!(matches!(err, SshError::Sftp { .. }), "{err:?}");
}

async fn pump<R, W>(mut r: R, mut w: W, frozen: Arc<std::sync::atomic::AtomicBool>)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16384];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if frozen.load(std::sync::atomic::Ordering::SeqCst) {
            // Swallow traffic but keep the sockets open.
            std::future::pending::<()>().await;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
}

/// TCP proxy that can be frozen: stops forwarding without closing, like a
/// machine that vanished from the network.
/// A proxy in front of `sshd` whose traffic stops (no reset) once the flag is set,
/// and the target that connects through it.
async fn freezable_proxy(sshd: &Sshd) -> (Target, Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::AtomicBool;
    let upstream = sshd.port;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let frozen = Arc::new(AtomicBool::new(false));
    let f = frozen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(("127.0.0.1", upstream))
                .await
                .expect("upstream");
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pump(cr, sw, f.clone()));
            tokio::spawn(pump(sr, cw, f.clone()));
        }
    });
    let mut target = sshd.target();
    target.port = port;
    // known_hosts entry is for the sshd port; the proxy port needs its own.
    target.host_key = HostKeyPolicy::KnownHosts(format!(
        "[127.0.0.1]:{port} {}\n",
        Keys::get().public("host_ed25519")
    ));
    (target, frozen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_detects_dead_connection() {
    init_tracing();
    let sshd = Sshd::start("keepalive");
    let (mut target, frozen) = freezable_proxy(&sshd).await;
    target.keepalive = Duration::from_millis(500);
    let session = ssh::connect(&target, &CancellationToken::new())
        .await
        .expect("connect via proxy");
    assert_eq!(run_ok(&session, "echo via-proxy").await.1, "via-proxy\n");
    let f = frozen.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        f.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let t0 = Instant::now();
    let res = tokio::time::timeout(
        Duration::from_secs(15),
        session.exec("sleep 6", |_, _| {}, &CancellationToken::new()),
    )
    .await
    .expect("keepalive must end the exec");
    println!("keepalive: {res:?} after {:?}", t0.elapsed());
    assert!(matches!(res, Err(SshError::Disconnected(_))), "{res:?}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_used_from_spawned_tasks() {
    init_tracing();
    let sshd = Sshd::start("spawned");
    let session = Arc::new(
        ssh::connect(&sshd.target(), &CancellationToken::new())
            .await
            .expect("connect"),
    );
    let dir = sshd.dir.clone();
    let mut tasks = Vec::new();
    for i in 0..4 {
        let s = session.clone();
        let dir: PathBuf = dir.clone();
        tasks.push(tokio::spawn(async move {
            let path = dir.join(format!("f{i}"));
            let p = path.to_str().expect("utf8").to_owned();
            s.upload(&p, format!("content {i}").as_bytes(), 0o600)
                .await
                .expect("upload");
            let (code, out) = run_ok(&s, &format!("cat {p}")).await;
            assert_eq!((code, out), (0, format!("content {i}")));
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    assert!(Path::new(&dir.join("f3")).exists());
}

/// Non-root login with dash as login shell, as the `kiln-build` user that
/// tests/env/up.sh creates when it runs as root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_root_user_with_dash_shell() {
    init_tracing();
    let exists = Command::new("id")
        .arg("kiln-build")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        exists,
        "no user kiln-build: run `bash tests/env/up.sh` (as root) first"
    );
    let sshd = Sshd::start("nonroot");
    let mut target = sshd.target();
    target.username = "kiln-build".into();
    let session = Arc::new(
        ssh::connect(&target, &CancellationToken::new())
            .await
            .expect("connect"),
    );
    let cap = Captured::default();
    let r = session
        .exec(
            "echo $0 $(id -un); echo e >&2; exit 7",
            cap.sink(),
            &CancellationToken::new(),
        )
        .await
        .expect("exec");
    assert_eq!(r.exit_code, Some(7));
    assert_eq!(cap.text(OutputStream::Stdout), "sh kiln-build\n");
    // sshd may print a chdir warning before the shell starts; the PID
    // marker that follows it must still be stripped.
    let stderr = cap.text(OutputStream::Stderr);
    assert!(
        stderr.ends_with("e\n") && !stderr.contains("kiln-pgid"),
        "{stderr:?}"
    );

    let marker = PathBuf::from("/tmp/kiln-nonroot-marker");
    let _ = std::fs::remove_file(&marker);
    let cancel = CancellationToken::new();
    let s = session.clone();
    let c = cancel.clone();
    let cmd = format!("sleep 3.5; touch {}", marker.display());
    let task = tokio::spawn(async move { s.exec(&cmd, |_, _| {}, &c).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    cancel.cancel();
    let res = task.await.expect("join");
    assert!(matches!(res, Err(SshError::Cancelled)), "{res:?}");
    assert!(
        t0.elapsed() < Duration::from_millis(1900),
        "{:?}",
        t0.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!marker.exists(), "marker appeared");
    // For non-root users OpenSSH honours the signal request itself.
    let log = sshd.log();
    assert!(log.contains("session_signal_req: signal TERM"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_session_is_reused_only_while_it_answers() {
    init_tracing();
    let sshd = Sshd::start("pool");
    let pool = SessionPool::default();
    let cancel = CancellationToken::new();

    // A live session comes back for its own generation: the same connection (the
    // shell's parent is the connection's sshd process).
    let s = ssh::connect(&sshd.target(), &cancel)
        .await
        .expect("connect");
    let parent = run_ok(&s, "echo $PPID").await.1;
    pool.keep("build", 1, s);
    let s = pool.take("build", 1).await.expect("the kept session");
    assert_eq!(run_ok(&s, "echo $PPID").await.1, parent);
    pool.keep("build", 1, s);
    assert!(
        pool.take("build", 2).await.is_none(),
        "a newer generation connects anew"
    );
    assert!(pool.is_empty(), "the older generation's session is closed");

    // A connection the host dropped between steps is not handed out.
    let s = ssh::connect(&sshd.target(), &cancel)
        .await
        .expect("connect");
    run_ok(&s, "true").await;
    pool.keep("build", 1, s);
    for pid in sshd.connection_pids() {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(pool.take("build", 1).await.is_none(), "dropped connection");

    // Nor is one that stopped answering without a reset (a half-open TCP
    // connection): the probe gives up within its timeout.
    let (target, frozen) = freezable_proxy(&sshd).await;
    let s = ssh::connect(&target, &cancel)
        .await
        .expect("connect via proxy");
    run_ok(&s, "true").await;
    pool.keep("build", 1, s);
    frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    let t0 = Instant::now();
    assert!(pool.take("build", 1).await.is_none(), "frozen connection");
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
}
