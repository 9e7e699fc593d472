//! EC2 clients from the spec: credentials from a Secret or the default AWS chain,
//! an optional endpoint, retries with backoff and jitter for throttling and 5xx.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_credential_types::Credentials;
use aws_sdk_ec2::config::Region;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::FinalizerInterceptorContextRef;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;

use crate::api::AmazonEbsBuilder;
use crate::engine::{BuildFacts, StepError};
use crate::refs;
use crate::sync::lock;

#[derive(Clone)]
pub struct Ec2 {
    pub client: aws_sdk_ec2::Client,
    pub region: String,
}

/// An EC2 error reduced to what a user needs: the action, AWS's code and message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("ec2 {action}: {code}: {message}")]
pub struct AwsError {
    pub action: &'static str,
    pub code: String,
    pub message: String,
}

impl AwsError {
    pub fn from_sdk<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug>(
        action: &'static str,
        e: SdkError<E, R>,
    ) -> Self {
        let (code, message) = match (e.code(), e.message()) {
            (Some(c), m) => (c.to_string(), m.unwrap_or("").to_string()),
            (None, _) => (
                "RequestFailed".to_string(),
                aws_sdk_ec2::error::DisplayErrorContext(&e).to_string(),
            ),
        };
        AwsError {
            action,
            code,
            message,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.code.ends_with(".NotFound") || self.code == "InvalidAMIID.Unavailable"
    }

    pub fn is(&self, code: &str) -> bool {
        self.code == code
    }

    /// The SDK already retried throttling and 5xx; what is left fails a run.
    pub fn fail(self) -> StepError {
        StepError::Failed(self.to_string())
    }

    /// In cleanup everything is retried: leaking is worse than trying again.
    pub fn retry(self) -> StepError {
        StepError::Transient(self.to_string())
    }
}

pub const SECRET_ACCESS_KEY_ID: &str = "AWS_ACCESS_KEY_ID";
pub const SECRET_SECRET_ACCESS_KEY: &str = "AWS_SECRET_ACCESS_KEY";
pub const SECRET_SESSION_TOKEN: &str = "AWS_SESSION_TOKEN";

/// A build's clients, by what makes one: a build's steps (about 16 clients for an
/// amazon-ebs build) share one per region instead of each reading the credentials
/// Secret again, and a region's first client takes the credentials of another
/// region's. Kept for `CLIENT_TTL`, so a rotated Secret takes effect within it.
type ClientKey = (String, i64, String, Option<String>, Option<String>);
static BUILD_CLIENTS: LazyLock<Mutex<HashMap<ClientKey, (Ec2, Instant)>>> =
    LazyLock::new(Mutex::default);
const CLIENT_TTL: Duration = Duration::from_secs(300);

impl Ec2 {
    /// The client of this build (uid and generation) for `region`: made once
    /// and shared by the build's steps for up to `CLIENT_TTL`.
    pub async fn for_build(
        ebs: &AmazonEbsBuilder,
        kube: &kube::Client,
        facts: &BuildFacts,
        region: &str,
    ) -> Result<Ec2, StepError> {
        let key: ClientKey = (
            facts.uid.clone(),
            facts.generation,
            region.to_string(),
            ebs.credentials.as_ref().map(|c| c.secret_ref.name.clone()),
            ebs.endpoint.clone(),
        );
        let (cached, sibling) = {
            let clients = lock(&BUILD_CLIENTS);
            let fresh = |made: &Instant| made.elapsed() < CLIENT_TTL;
            let cached = clients
                .get(&key)
                .filter(|(_, made)| fresh(made))
                .map(|(ec2, _)| ec2.clone());
            // Same build, Secret and endpoint; another region.
            let sibling = clients
                .iter()
                .find(|((uid, g, _, secret, endpoint), (_, made))| {
                    (uid, *g, secret, endpoint) == (&key.0, key.1, &key.3, &key.4) && fresh(made)
                })
                .map(|(_, (ec2, made))| (ec2.clone(), *made));
            (cached, sibling)
        };
        if let Some(ec2) = cached {
            return Ok(ec2);
        }
        let (ec2, made) = match sibling {
            // Expires with the client it was made from: the Secret was read then.
            Some((other, made)) => (other.in_region(region), made),
            None => (
                Ec2::new(ebs, kube, &facts.namespace, region).await?,
                Instant::now(),
            ),
        };
        let mut clients = lock(&BUILD_CLIENTS);
        clients.retain(|_, (_, made)| made.elapsed() < CLIENT_TTL);
        clients.insert(key, (ec2.clone(), made));
        Ok(ec2)
    }

    /// The same client (credentials, endpoint, retries, metrics) for another region.
    fn in_region(&self, region: &str) -> Ec2 {
        let config = self
            .client
            .config()
            .to_builder()
            .region(Region::new(region.to_string()))
            .build();
        Ec2 {
            client: aws_sdk_ec2::Client::from_conf(config),
            region: region.to_string(),
        }
    }

    /// A new client: reads the credentials Secret (see `for_build` for a build's).
    pub async fn new(
        ebs: &AmazonEbsBuilder,
        kube: &kube::Client,
        namespace: &str,
        region: &str,
    ) -> Result<Ec2, StepError> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http_client())
            .region(Region::new(region.to_string()))
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(10)
                    .with_initial_backoff(Duration::from_millis(100))
                    .with_max_backoff(Duration::from_secs(10)),
            )
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .operation_attempt_timeout(Duration::from_secs(30))
                    .connect_timeout(Duration::from_secs(5))
                    .build(),
            );
        if let Some(creds) = &ebs.credentials {
            let name = &creds.secret_ref.name;
            let field = "spec.builder.amazonEBS.credentials.secretRef";
            let mut values = refs::secret_keys(
                kube,
                namespace,
                name,
                &[
                    SECRET_ACCESS_KEY_ID,
                    SECRET_SECRET_ACCESS_KEY,
                    SECRET_SESSION_TOKEN,
                ],
                field,
            )
            .await
            .map_err(|e| match e {
                // Cleanup retries this; say what unblocks it.
                refs::RefError::NotFound { .. } => StepError::Failed(format!(
                    "{e}: kiln needs it to create and to remove this build's cloud resources; recreate it (while a build has anything to clean up, kiln holds it with the finalizer kiln.dev/cleanup-<uid>)"
                )),
                other => StepError::Failed(other.to_string()),
            })?
            .into_iter();
            let mut required = |key: &str| {
                values.next().flatten().ok_or_else(|| {
                    StepError::Failed(format!(
                        "{field}: Secret {namespace}/{name} has no key {key:?}"
                    ))
                })
            };
            let id = required(SECRET_ACCESS_KEY_ID)?;
            let secret = required(SECRET_SECRET_ACCESS_KEY)?;
            let token = match values.next().flatten() {
                Some(t) => Some(utf8(t.0, field)?),
                None => None,
            };
            loader = loader.credentials_provider(Credentials::new(
                utf8(id.0, field)?,
                utf8(secret.0, field)?,
                token,
                None,
                "kiln-secret",
            ));
        }
        if let Some(endpoint) = &ebs.endpoint {
            loader = loader.endpoint_url(endpoint.clone());
        }
        let config = loader.load().await;
        let config = aws_sdk_ec2::config::Builder::from(&config)
            .interceptor(CallMetrics)
            .build();
        Ok(Ec2 {
            client: aws_sdk_ec2::Client::from_conf(config),
            region: region.to_string(),
        })
    }
}

/// Counts every EC2 request attempt (retries included) by action and outcome.
#[derive(Debug)]
struct CallMetrics;

impl Intercept for CallMetrics {
    fn name(&self) -> &'static str {
        "kiln-call-metrics"
    }

    fn read_after_attempt(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let action = cfg.load::<Metadata>().map_or("unknown", |m| m.name());
        let outcome = match context.response().map(|r| r.status().as_u16()) {
            None => "transport_error",
            Some(200..=299) => "success",
            // EC2 throttles with 503 RequestLimitExceeded.
            Some(429 | 503) => "throttled",
            Some(400..=499) => "client_error",
            Some(_) => "server_error",
        };
        crate::metrics::get().cloud_call("aws", action, outcome);
        Ok(())
    }
}

/// HTTPS for the AWS SDK: rustls with ring and the system's trust roots.
///
/// One for the process, shared by every client: building one loads the root
/// certificates (the largest cost of a pipeline's source check, by a profile of the
/// benchmark), and a shared one keeps its connections for the next call. Its
/// pooled connections belong to the runtime that opened them: the operator has one.
pub fn http_client() -> aws_sdk_ec2::config::SharedHttpClient {
    static SHARED: std::sync::OnceLock<aws_sdk_ec2::config::SharedHttpClient> =
        std::sync::OnceLock::new();
    SHARED.get_or_init(new_http_client).clone()
}

/// A client of its own, for code that runs several runtimes (tests).
pub fn new_http_client() -> aws_sdk_ec2::config::SharedHttpClient {
    use aws_smithy_http_client::tls;
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

fn utf8(b: Vec<u8>, field: &str) -> Result<String, StepError> {
    String::from_utf8(b)
        .map(|s| s.trim().to_string())
        .map_err(|_| StepError::Failed(format!("{field}: credentials are not UTF-8 text")))
}
