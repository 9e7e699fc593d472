use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Machine images built like Packer, as a Kubernetes resource"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator.
    Run(Box<RunArgs>),
    /// Print kiln's CustomResourceDefinitions as YAML (both, or the one named).
    Crd {
        #[arg(value_enum)]
        kind: Option<CrdKind>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Watch only these namespaces, comma-separated or repeated (default: all namespaces).
    #[arg(long, env = "KILN_NAMESPACE", value_delimiter = ',')]
    namespace: Vec<String>,
    /// How many ImageBuilds are reconciled at once; as many finished steps are recorded
    /// at once in a lane of their own. Steps run in the background and do not count.
    #[arg(long, env = "KILN_CONCURRENCY", default_value_t = 16)]
    concurrency: u16,
    #[arg(long, env = "KILN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// URL prefixes `spec.builder.amazonEBS.endpoint` may start with, comma-separated
    /// (e.g. `https://ec2.eu-west-1.amazonaws.com,https://vpce-`). An endpoint gets
    /// requests signed with the operator's credentials; by default none is allowed.
    #[arg(long, env = "KILN_ALLOWED_ENDPOINTS", value_delimiter = ',')]
    allowed_endpoints: Vec<String>,
    /// How long running steps get to stop on SIGTERM.
    #[arg(long, env = "KILN_SHUTDOWN_GRACE_SECONDS", default_value_t = 10)]
    shutdown_grace_seconds: u64,
    /// Kubeconfig to use instead of the in-cluster or default configuration.
    #[arg(long, env = "KILN_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Address for /metrics, /healthz and /readyz; an empty value turns them off.
    #[arg(long, env = "KILN_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: String,
    /// Reconcile only while holding a coordination.k8s.io Lease, so that several
    /// replicas can run with one active.
    #[arg(long, env = "KILN_LEADER_ELECT", default_value_t = false)]
    leader_elect: bool,
    /// Namespace of the Lease (default: POD_NAMESPACE, else the service account's
    /// namespace, else the kubeconfig's namespace).
    #[arg(long, env = "KILN_LEADER_ELECTION_NAMESPACE")]
    leader_election_namespace: Option<String>,
    #[arg(long, env = "KILN_LEASE_NAME", default_value = "kiln-leader")]
    lease_name: String,
    /// How long a lease stays valid without renewal: the longest a standby waits
    /// after the leader dies. Renewed a third of it before expiry.
    #[arg(long, env = "KILN_LEASE_DURATION_SECONDS", default_value_t = 15)]
    lease_duration_seconds: u64,
    /// This replica's identity in the Lease (default: POD_NAME, else hostname-pid).
    #[arg(long, env = "KILN_LEADER_IDENTITY")]
    leader_identity: Option<String>,
    /// Image of runner Pods (shellLocal, ansible) whose provisioner names none.
    #[arg(long, env = "KILN_RUNNER_IMAGE")]
    runner_image: Option<String>,
    /// Resources and placement of runner Pods, JSON: `{"resources": …,
    /// "nodeSelector": …, "tolerations": […], "affinity": …, "priorityClassName": …}`.
    #[arg(long, env = "KILN_RUNNER_POD", default_value = "")]
    runner_pod: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum CrdKind {
    Imagebuild,
    Imagepipeline,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd { kind } => {
            match kind {
                Some(CrdKind::Imagebuild) => print!("{}", kiln::api::crd_yaml()?),
                Some(CrdKind::Imagepipeline) => print!("{}", kiln::api::pipeline_crd_yaml()?),
                None => print!(
                    "{}---\n{}",
                    kiln::api::crd_yaml()?,
                    kiln::api::pipeline_crd_yaml()?
                ),
            }
            Ok(())
        }
        Command::Run(args) => {
            init_logging(args.log_format);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(run(*args))
        }
    }
}

/// Log targets that write credentials or signatures at debug and trace level.
const CREDENTIAL_LOGGERS: [&str; 6] = [
    "aws_sigv4",
    "aws_config",
    "aws_credential_types",
    "aws_smithy_runtime",
    "aws_smithy_runtime_api",
    "aws_smithy_http_client",
];

fn init_logging(format: LogFormat) {
    let mut filter = EnvFilter::try_from_env("KILN_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info,kube=warn,russh=warn,hyper=warn,tower=warn"));
    // Whatever level is asked for: at debug and below the AWS SDK logs what it signs
    // and the credentials it resolved (the access key ID among them).
    for quiet in CREDENTIAL_LOGGERS {
        if let Ok(d) = format!("{quiet}=info").parse() {
            filter = filter.add_directive(d);
        }
    }
    // Colour codes only for a terminal: in a Pod's log or a file they are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = match &args.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
            kube::Client::try_from(cfg)?
        }
        None => kube::Client::try_default().await?,
    };
    let leader_election = if args.leader_elect {
        let namespace = match args.leader_election_namespace {
            Some(ns) => ns,
            None => std::env::var("POD_NAMESPACE")
                .ok()
                .filter(|s| !s.is_empty())
                .or_else(|| {
                    std::fs::read_to_string(
                        "/var/run/secrets/kubernetes.io/serviceaccount/namespace",
                    )
                    .ok()
                    .map(|s| s.trim().to_string())
                })
                .unwrap_or_else(|| client.default_namespace().to_string()),
        };
        let identity = args.leader_identity.unwrap_or_else(|| {
            std::env::var("POD_NAME")
                .ok()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| {
                    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                        .map(|h| h.trim().to_string())
                        .unwrap_or_else(|_| "kiln".into());
                    format!("{host}-{}", std::process::id())
                })
        });
        Some(kiln::leader::Settings {
            namespace,
            lease_name: args.lease_name,
            identity,
            duration_seconds: args.lease_duration_seconds,
        })
    } else {
        None
    };
    let runner = kiln::provisioners::runner::Defaults {
        image: args.runner_image.filter(|i| !i.is_empty()),
        pod: kiln::provisioners::runner::PodSettings::parse(&args.runner_pod)
            .map_err(anyhow::Error::msg)?,
    };
    kiln::controller::run(
        client,
        kiln::controller::Settings {
            namespaces: args
                .namespace
                .into_iter()
                .filter(|n| !n.is_empty())
                .collect(),
            concurrency: args.concurrency,
            shutdown_grace: Duration::from_secs(args.shutdown_grace_seconds),
            metrics_addr: Some(args.metrics_addr).filter(|a| !a.is_empty()),
            leader_election,
            policy: kiln::builders::Policy {
                allowed_endpoints: args
                    .allowed_endpoints
                    .into_iter()
                    .filter(|e| !e.is_empty())
                    .collect(),
            },
            runner: std::sync::Arc::new(runner),
        },
    )
    .await
}
