//! Prometheus metrics, in one process-wide registry.
//!
//! Global because what is measured happens deep in the stack (an EC2 call inside a
//! step, an SSH session inside a provisioner) and threading a handle through every
//! context would touch every signature for no gain. Labels are bounded by the code
//! (controller, result, phase, builder, step kind, EC2 action): never an object name.

use std::sync::LazyLock;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

pub const CONTROLLER: &str = "imagebuild";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    pub controller: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    pub builder: &'static str,
    pub step: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloudLabels {
    pub provider: &'static str,
    pub action: String,
    pub outcome: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<ReconcileLabels, Counter>,
    pub reconcile_duration: HistogramFamily<ControllerLabels>,
    pub builds: Family<PhaseLabels, Gauge>,
    pub step_duration: HistogramFamily<StepLabels>,
    pub step_transition: Histogram,
    pub cloud_calls: Family<CloudLabels, Counter>,
    pub ssh_sessions: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub ssh_connections: Counter<u64, AtomicU64>,
    pub leader: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub status_writes: Counter<u64, AtomicU64>,
}

fn fast_buckets() -> Histogram {
    // 1 ms .. ~33 s: reconciles are milliseconds, a slow apiserver is seconds.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn step_buckets() -> Histogram {
    // 10 ms .. ~3 h: a connect is sub-second, an AMI copy can take an hour or more.
    Histogram::new(exponential_buckets(0.01, 2.5, 16))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("kiln");
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles by controller and result (ok or error)",
            reconciles.clone(),
        );
        let reconcile_duration: HistogramFamily<ControllerLabels> =
            Family::new_with_constructor(fast_buckets);
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile takes, from the fresh read to the last write",
            reconcile_duration.clone(),
        );
        let builds = Family::<PhaseLabels, Gauge>::default();
        registry.register(
            "builds",
            "ImageBuilds this operator watches, by status.phase",
            builds.clone(),
        );
        let step_duration: HistogramFamily<StepLabels> = Family::new_with_constructor(step_buckets);
        registry.register(
            "step_duration_seconds",
            "Time a step's run takes, by builder, step kind and result",
            step_duration.clone(),
        );
        let step_transition = fast_buckets();
        registry.register(
            "step_transition_seconds",
            "Controller overhead between a step's finish and the next step's start",
            step_transition.clone(),
        );
        let cloud_calls = Family::<CloudLabels, Counter>::default();
        registry.register(
            "cloud_api_calls",
            "Cloud API call attempts by provider, action and outcome \
             (success, throttled, client_error, server_error, transport_error)",
            cloud_calls.clone(),
        );
        let ssh_sessions = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        registry.register(
            "ssh_sessions_open",
            "SSH sessions currently open to build machines",
            ssh_sessions.clone(),
        );
        let ssh_connections = Counter::<u64, AtomicU64>::default();
        registry.register(
            "ssh_connections",
            "SSH connections opened to build machines (a build keeps one for its steps)",
            ssh_connections.clone(),
        );
        let leader = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader lease (or runs without leader election)",
            leader.clone(),
        );
        let status_writes = Counter::<u64, AtomicU64>::default();
        registry.register(
            "status_writes",
            "Writes of ImageBuild status and finalizers to the apiserver",
            status_writes.clone(),
        );
        Metrics {
            registry,
            reconciles,
            reconcile_duration,
            builds,
            step_duration,
            step_transition,
            cloud_calls,
            ssh_sessions,
            ssh_connections,
            leader,
            status_writes,
        }
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    pub fn reconciled(&self, ok: bool, took: Duration) {
        self.reconciled_by(CONTROLLER, ok, took);
    }

    /// A reconcile of the given controller (`imagebuild`, `imagepipeline`).
    pub fn reconciled_by(&self, controller: &'static str, ok: bool, took: Duration) {
        self.reconciles
            .get_or_create(&ReconcileLabels {
                controller,
                result: if ok { "ok" } else { "error" },
            })
            .inc();
        self.reconcile_duration
            .get_or_create(&ControllerLabels { controller })
            .observe(took.as_secs_f64());
    }

    /// Replaces the per-phase counts; phases with no build report 0 so that a
    /// query never sees a series vanish.
    pub fn set_builds(&self, counts: &[(&'static str, i64)]) {
        for (phase, n) in counts {
            self.builds.get_or_create(&PhaseLabels { phase }).set(*n);
        }
    }

    pub fn step_finished(
        &self,
        builder: &'static str,
        step: &str,
        result: &'static str,
        took: Duration,
    ) {
        self.step_duration
            .get_or_create(&StepLabels {
                builder,
                step: step.to_string(),
                result,
            })
            .observe(took.as_secs_f64());
    }

    pub fn cloud_call(&self, provider: &'static str, action: &str, outcome: &'static str) {
        self.cloud_calls
            .get_or_create(&CloudLabels {
                provider,
                action: action.to_string(),
                outcome,
            })
            .inc();
    }
}

pub fn get() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

/// Counts an open SSH session for as long as it lives.
#[derive(Debug)]
pub struct SessionGauge(());

impl SessionGauge {
    pub fn open() -> Self {
        get().ssh_connections.inc();
        get().ssh_sessions.inc();
        SessionGauge(())
    }
}

impl Drop for SessionGauge {
    fn drop(&mut self) {
        get().ssh_sessions.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_families_with_bounded_labels() {
        let m = Metrics::new();
        m.reconciled(true, Duration::from_millis(3));
        m.step_finished("null", "shell", "succeeded", Duration::from_secs(2));
        m.cloud_call("aws", "RunInstances", "success");
        m.set_builds(&[("Running", 2), ("Succeeded", 0)]);
        let text = m.encode().expect("encode");
        assert!(
            text.contains(r#"kiln_reconciles_total{controller="imagebuild",result="ok"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"kiln_builds{phase="Running"} 2"#), "{text}");
        assert!(
            text.contains(r#"kiln_builds{phase="Succeeded"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"kiln_cloud_api_calls_total{provider="aws",action="RunInstances",outcome="success"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"kiln_step_duration_seconds_count{builder="null",step="shell",result="succeeded"} 1"#),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn session_gauge_follows_lifetimes() {
        let before = get().ssh_sessions.get();
        let a = SessionGauge::open();
        let b = SessionGauge::open();
        assert_eq!(get().ssh_sessions.get(), before + 2);
        drop(a);
        drop(b);
        assert_eq!(get().ssh_sessions.get(), before);
    }
}
