//! The Kubernetes runner: each attempt runs as a Job of one pod in the user's cluster, made through
//! the API server (kube-rs), watched rather than polled, its log streamed to the attempt's log
//! files as it comes. Retries stay ccluster's (`backoffLimit: 0`); the pod's end is mapped to
//! ccluster's classes (`oom`, `timeout`, `infra`, `image`, `unschedulable`). Credentials live in
//! one Secret per run, referenced by `secretKeyRef`, never in a Job's spec. Jobs carry labels of
//! their state directory, runner, run, node and attempt: a later `apply` finds what a killed
//! ccluster left, harvests finished Jobs and adopts running ones ([`Runner::recover`]).
//!
//! Pods cannot see the driver's disk: a task's workspace travels by git through the run's
//! endpoint ([`super::endpoint`]): the pod fetches the attempt's start commit into an empty
//! directory at the workspace's path, and pushes what it made; the commit's changes are applied to
//! the local worktree, and from there the attempt ends as on any runner.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{AsyncBufReadExt, StreamExt};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    LocalObjectReference, Pod, PodSpec, PodTemplateSpec, ResourceRequirements, Secret,
    SecretKeySelector, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::ByteString;
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams, PropagationPolicy};
use kube::runtime::watcher;
use tokio::sync::watch;
use tokio::time::Instant;

use super::lines::LineSplitter;
use super::runner::{LazyLog, ProcessEnd, ProcessFuture, ProcessResult, ProcessSpec, Runner, Stop};
use crate::model::raw::{FailureClass, NetworkMode, PullPolicy};
use crate::model::workflow::KubernetesSettings;

/// Label keys of everything the runner makes: how a later `apply` or `gc` finds them.
pub const LABEL_STATE: &str = "ccluster.dev/state";
pub const LABEL_RUNNER: &str = "ccluster.dev/runner";
pub const LABEL_RUN: &str = "ccluster.dev/run";
pub const LABEL_NODE: &str = "ccluster.dev/node";
pub const LABEL_ATTEMPT: &str = "ccluster.dev/attempt";
/// On a Job's pod: the Job's name (the Job controller's own `job-name` label is not in every
/// version's pods the same way; ours is).
pub const LABEL_JOB: &str = "ccluster.dev/job";
/// `api-only` pods: what the run's NetworkPolicy selects.
pub const LABEL_NETWORK: &str = "ccluster.dev/network";
/// Annotations: the full values labels cannot hold.
pub const NOTE_NODE: &str = "ccluster.dev/node";
pub const NOTE_KEY: &str = "ccluster.dev/key";
pub const NOTE_WORKSPACE: &str = "ccluster.dev/workspace";
pub const NOTE_STATE: &str = "ccluster.dev/state";
/// The commit a pod's workspace starts from (the result's parent).
pub const NOTE_START: &str = "ccluster.dev/start";
/// The pod talks to its model API through the driver's relay: it cannot outlive the driver.
pub const NOTE_RELAY: &str = "ccluster.dev/relay";

/// The task's container in each pod.
const CONTAINER: &str = "task";
/// Where the pod's own files are: the attempt's inputs (a ConfigMap) and scratch space.
const POD_DIR: &str = "/ccluster";
/// What marks a line of the pod's log as the task's stderr: Kubernetes merges the two streams.
const STDERR_MARK: &str = "\u{1e}\u{1e}";
/// The exit code of a pod whose workspace could not be fetched or pushed (the endpoint was
/// unreachable): an infrastructure failure, not the task's.
const TRANSPORT_FAILED: i32 = 222;
/// How long a finished container's log is still read.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(5);

/// Runs each attempt as a Job in a Kubernetes namespace.
pub struct KubernetesRunner {
    inner: Arc<Inner>,
}

struct Inner {
    client: kube::Client,
    namespace: String,
    image: String,
    settings: KubernetesSettings,
    /// The runner's name in the clusterfile.
    name: String,
    /// The hub of the runner's watches, started with the first attempt.
    hub: tokio::sync::OnceCell<Arc<Hub>>,
    /// Each run's Secret of credentials, by run: its name, and the keys already in it.
    secrets: tokio::sync::Mutex<HashMap<String, RunSecret>>,
    /// Jobs a killed ccluster left that an attempt of this run may adopt.
    kept: Mutex<Vec<KeptJob>>,
    /// The state directory the runner serves (set by `recover`, else by the first attempt).
    state: Mutex<Option<PathBuf>>,
    /// Where the run's git endpoint listens, as pods reach it (`ip[:port]`); `None`: the
    /// address the API server is reached from, found when the endpoint is first needed.
    advertise: Option<String>,
    /// The run's git endpoint (and model relay), started when an attempt first needs it.
    endpoint: tokio::sync::OnceCell<Result<Arc<super::endpoint::Endpoint>, String>>,
    /// The API server's address: what the default advertised address is found from.
    server: String,
    /// The NetworkPolicies made for this run (by name).
    policies: tokio::sync::Mutex<std::collections::HashSet<String>>,
}

struct RunSecret {
    /// Secret key of each (variable, value) pair already in it.
    keys: HashMap<(String, String), String>,
    /// Keys the values are hashed with: a key's name reveals nothing of its value.
    salt: [u8; 32],
}

/// A Job found by [`Runner::recover`], waiting to be adopted.
struct KeptJob {
    name: String,
    node: String,
    key: String,
    workspace: Option<PathBuf>,
}

impl KubernetesRunner {
    /// Reads the kubeconfig (its `context`, else the current one; in a pod, the in-cluster
    /// config) and checks that the API server answers and the namespace exists, before anything
    /// starts.
    pub async fn connect(
        name: &str,
        image: &str,
        settings: KubernetesSettings,
        advertise: Option<String>,
    ) -> Result<KubernetesRunner, String> {
        let config = match &settings.context {
            Some(context) => kube::Config::from_kubeconfig(&kube::config::KubeConfigOptions {
                context: Some(context.clone()),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("cannot read the kubeconfig's context `{context}`: {e}"))?,
            None => kube::Config::infer()
                .await
                .map_err(|e| format!("cannot find a Kubernetes configuration: {e}"))?,
        };
        let namespace = settings
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let server = config.cluster_url.to_string();
        let client = kube::Client::try_from(config.clone())
            .map_err(|e| format!("cannot make a Kubernetes client: {e}"))?;
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
        namespaces.get(&namespace).await.map_err(|e| match &e {
            kube::Error::Api(s) if s.code == 404 => {
                format!("the namespace `{namespace}` does not exist on {server}")
            }
            kube::Error::Api(s) if s.code == 403 => format!(
                "the Kubernetes API at {server} refuses to show namespace `{namespace}`: {} \
                 (docs/runners.md lists the permissions the runner needs)",
                s.message
            ),
            _ => format!("cannot reach the Kubernetes API at {server}: {e}"),
        })?;
        Ok(KubernetesRunner {
            inner: Arc::new(Inner {
                client,
                namespace,
                image: image.to_string(),
                settings,
                name: name.to_string(),
                hub: Default::default(),
                secrets: Default::default(),
                kept: Default::default(),
                state: Default::default(),
                advertise,
                endpoint: Default::default(),
                server,
                policies: Default::default(),
            }),
        })
    }
}

impl Inner {
    fn jobs(&self) -> Api<Job> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The labels that mark what this runner made for the state directory `state`.
    fn selector(&self, state: &Path) -> String {
        format!(
            "{LABEL_STATE}={},{LABEL_RUNNER}={}",
            label_hash(&state.display().to_string()),
            label_value(&self.name)
        )
    }

    async fn hub(&self, state: &Path) -> Arc<Hub> {
        self.hub
            .get_or_init(|| async {
                Hub::start(self.client.clone(), &self.namespace, &self.selector(state))
            })
            .await
            .clone()
    }

    /// The run's Secret, made (or completed) so that it holds each of `pairs`: the name of the
    /// Secret, and the key of each pair in it. Keys are the variable's name and a keyed hash of
    /// its value: a key's name tells nothing of the value.
    async fn secret_keys(
        &self,
        run: &str,
        state: &Path,
        pairs: &[(String, String)],
    ) -> Result<(String, Vec<String>), String> {
        let mut data = BTreeMap::new();
        let keys: Vec<String> = {
            let mut secrets = self.secrets.lock().await;
            let entry = secrets.entry(run.to_string()).or_insert_with(|| RunSecret {
                keys: HashMap::new(),
                salt: random_salt(),
            });
            pairs
                .iter()
                .map(|(k, v)| {
                    let pair = (k.clone(), v.clone());
                    if let Some(key) = entry.keys.get(&pair) {
                        return key.clone();
                    }
                    let hash = blake3::keyed_hash(&entry.salt, v.as_bytes()).to_hex();
                    let key = format!("{k}.{}", &hash[..12]);
                    data.insert(key.clone(), ByteString(v.clone().into_bytes()));
                    entry.keys.insert(pair, key.clone());
                    key
                })
                .collect()
        };
        if !data.is_empty() {
            self.secret_put(run, state, data).await?;
        }
        Ok((secret_name(run), keys))
    }

    /// Adds `data` to the run's Secret, making it if it is not there.
    async fn secret_put(
        &self,
        run: &str,
        state: &Path,
        data: BTreeMap<String, ByteString>,
    ) -> Result<(), String> {
        let name = secret_name(run);
        self.secrets
            .lock()
            .await
            .entry(run.to_string())
            .or_insert_with(|| RunSecret {
                keys: HashMap::new(),
                salt: random_salt(),
            });
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let patch = serde_json::json!({ "data": data });
        match api
            .patch(
                &name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(format!("cannot update Secret `{name}`: {}", api_error(&e))),
        }
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(self.labels(state, run)),
                ..Default::default()
            },
            data: Some(data.clone()),
            type_: Some("Opaque".into()),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => Ok(()),
            // Made meanwhile by another attempt: add to it.
            Err(kube::Error::Api(s)) if s.code == 409 => api
                .patch(
                    &name,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&patch),
                )
                .await
                .map(|_| ())
                .map_err(|e| format!("cannot update Secret `{name}`: {}", api_error(&e))),
            Err(e) => Err(format!("cannot make Secret `{name}`: {}", api_error(&e))),
        }
    }

    /// The run's endpoint, started on first need: on the address the runner advertises, or
    /// (after `kill -9`) on the port and with the token its killed predecessor gave to pods that
    /// may still run.
    async fn endpoint(
        &self,
        run: &str,
        state: &Path,
        repo_dir: &Path,
    ) -> Result<Arc<super::endpoint::Endpoint>, String> {
        self.endpoint
            .get_or_init(|| async {
                self.start_endpoint(run, state, repo_dir)
                    .await
                    .map(Arc::new)
            })
            .await
            .clone()
    }

    async fn start_endpoint(
        &self,
        run: &str,
        state: &Path,
        repo_dir: &Path,
    ) -> Result<super::endpoint::Endpoint, String> {
        use super::endpoint::Endpoint;
        let common = crate::workspace::git_sync(repo_dir, &["rev-parse", "--git-common-dir"])?;
        let git_dir = repo_dir.join(common.trim());
        let advertise = match &self.advertise {
            Some(a) => a.clone(),
            None => default_advertise(&self.server)?,
        };
        let (host, port) = match advertise.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() && !h.ends_with(':') => {
                (h.to_string(), p.parse::<u16>().ok())
            }
            _ => (advertise.clone(), None),
        };
        let ip: std::net::IpAddr = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| {
                format!(
                    "the advertised address `{advertise}` is not an IP address (`--advertise-addr IP[:PORT]`)"
                )
            })?;
        let transport = state.join("transport").join(format!("{run}.git"));
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let name = secret_name(run);
        // What a killed ccluster of this run gave its pods: the same port and token, so that
        // pods it left running can still push.
        let before = secrets
            .get_opt(&name)
            .await
            .ok()
            .flatten()
            .and_then(|s| s.data?.get(ENDPOINT_KEY).cloned())
            .and_then(|v| {
                let text = String::from_utf8(v.0).ok()?;
                let (port, token) = text.split_once(' ')?;
                Some((port.parse::<u16>().ok()?, token.to_string()))
            });
        let mut started = None;
        if let Some((old_port, token)) = before {
            if port.is_none_or(|p| p == old_port) {
                started = Endpoint::start_with_token(
                    run,
                    &git_dir,
                    &transport,
                    std::net::SocketAddr::new(ip, old_port),
                    &host,
                    None,
                    token,
                )
                .await
                .ok();
            }
        }
        let endpoint = match started {
            Some(e) => e,
            None => Endpoint::start(
                run,
                &git_dir,
                &transport,
                std::net::SocketAddr::new(ip, port.unwrap_or(0)),
                &host,
                None,
            )
            .await
            .map_err(|e| {
                format!(
                    "{e} (the address given by `--advertise-addr`, or found from the API server's)"
                )
            })?,
        };
        let url = endpoint.git_url();
        let bound = url
            .rsplit_once(':')
            .and_then(|(_, rest)| rest.split('/').next())
            .unwrap_or_default()
            .to_string();
        let mut data = BTreeMap::new();
        data.insert(
            ENDPOINT_KEY.to_string(),
            ByteString(format!("{bound} {}", endpoint.token()).into_bytes()),
        );
        self.secret_put(run, state, data).await?;
        Ok(endpoint)
    }

    /// The run's NetworkPolicy for pods on `network` (`api-only` or `none`), made once: egress
    /// only to the run's endpoint, and under `api-only` to the model API's and `allow_hosts`'
    /// addresses (as they resolve now) and DNS. It holds where the cluster's network plugin
    /// enforces policies; elsewhere it is a statement only.
    async fn network_policy(
        &self,
        run: &str,
        state: &Path,
        network: NetworkMode,
        endpoint: Option<&super::endpoint::Endpoint>,
        model_api: Option<&str>,
    ) -> Result<(), String> {
        use k8s_openapi::api::networking::v1::{
            IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyPeer, NetworkPolicyPort,
            NetworkPolicySpec,
        };
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
        use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
        let name = truncate_name(&format!("ccluster-{}-{}", dns_label(run), network.name()));
        if !self.policies.lock().await.insert(name.clone()) {
            return Ok(());
        }
        let rule =
            |ip: std::net::IpAddr, port: Option<u16>, protocol: &str| NetworkPolicyEgressRule {
                to: Some(vec![NetworkPolicyPeer {
                    ip_block: Some(IPBlock {
                        cidr: match ip {
                            std::net::IpAddr::V4(_) => format!("{ip}/32"),
                            std::net::IpAddr::V6(_) => format!("{ip}/128"),
                        },
                        except: None,
                    }),
                    ..Default::default()
                }]),
                ports: Some(vec![NetworkPolicyPort {
                    port: port.map(|p| IntOrString::Int(i32::from(p))),
                    protocol: Some(protocol.into()),
                    ..Default::default()
                }]),
            };
        let mut egress = Vec::new();
        if let Some(ep) = endpoint {
            if let Some(addr) = super::egress::Allow::host_of_url(&ep.git_url())
                .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
            {
                egress.push(rule(addr.ip(), Some(addr.port()), "TCP"));
            }
        }
        if network == NetworkMode::ApiOnly {
            let mut hosts: Vec<String> = self.settings.allow_hosts.clone();
            hosts.extend(
                model_api
                    .filter(|a| !on_loopback(a))
                    .and_then(super::egress::Allow::host_of_url),
            );
            for host in hosts {
                let host = host.trim_start_matches("*.").to_string();
                let (name, port) = match host.rsplit_once(':') {
                    Some((h, p)) if p.parse::<u16>().is_ok() => (h.to_string(), p.parse().ok()),
                    _ => (host.clone(), None),
                };
                let lookup = format!("{name}:{}", port.unwrap_or(443));
                let found = tokio::net::lookup_host(lookup.clone()).await.map_err(|e| {
                    format!("cannot resolve `{name}` for the `api-only` NetworkPolicy: {e}")
                })?;
                for addr in found {
                    egress.push(rule(addr.ip(), port, "TCP"));
                }
            }
            // Names must resolve.
            for protocol in ["UDP", "TCP"] {
                egress.push(NetworkPolicyEgressRule {
                    to: None,
                    ports: Some(vec![NetworkPolicyPort {
                        port: Some(IntOrString::Int(53)),
                        protocol: Some(protocol.into()),
                        ..Default::default()
                    }]),
                });
            }
        }
        let selector: BTreeMap<String, String> = [
            (LABEL_RUN.to_string(), label_value(run)),
            (LABEL_NETWORK.to_string(), network.name().to_string()),
        ]
        .into();
        let policy = NetworkPolicy {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(self.labels(state, run)),
                ..Default::default()
            },
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(LabelSelector {
                    match_labels: Some(selector),
                    ..Default::default()
                }),
                policy_types: Some(vec!["Egress".into()]),
                egress: Some(egress),
                ingress: None,
            }),
        };
        let api: Api<NetworkPolicy> = Api::namespaced(self.client.clone(), &self.namespace);
        match api.create(&PostParams::default(), &policy).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => api
                .replace(&name, &PostParams::default(), &policy)
                .await
                .map(|_| ())
                .map_err(|e| format!("cannot update NetworkPolicy `{name}`: {}", api_error(&e))),
            Err(e) => Err(format!(
                "cannot make NetworkPolicy `{name}`: {}",
                api_error(&e)
            )),
        }
    }

    /// The labels of everything the runner makes for run `run`.
    fn labels(&self, state: &Path, run: &str) -> BTreeMap<String, String> {
        let mut labels: BTreeMap<String, String> = self
            .settings
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.insert(LABEL_STATE.into(), label_hash(&state.display().to_string()));
        labels.insert(LABEL_RUNNER.into(), label_value(&self.name));
        labels.insert(LABEL_RUN.into(), label_value(run));
        labels
    }
}

/// The key of the run's Secret that remembers its endpoint's port and token.
const ENDPOINT_KEY: &str = "endpoint";

/// The run's Secret of credentials.
fn secret_name(run: &str) -> String {
    truncate_name(&format!("ccluster-{}-credentials", dns_label(run)))
}

/// The address of this machine the API server is reached from: the one pods most likely reach
/// it at too. Refused when that is loopback (a cluster on this machine's loopback reaches it
/// elsewhere).
fn default_advertise(server: &str) -> Result<String, String> {
    let authority = super::egress::Allow::host_of_url(server)
        .ok_or_else(|| format!("cannot read the API server's address from `{server}`"))?;
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority
    } else {
        format!("{authority}:443")
    };
    use std::net::ToSocketAddrs;
    let target = with_port
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve the API server `{with_port}`: {e}"))?
        .next()
        .ok_or_else(|| format!("the API server `{with_port}` has no address"))?;
    // Connecting a UDP socket sends nothing: it only picks the route, and so the local address.
    let bind = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket =
        std::net::UdpSocket::bind(bind).map_err(|e| format!("cannot find a local address: {e}"))?;
    socket
        .connect(target)
        .map_err(|e| format!("cannot find a route to the API server {target}: {e}"))?;
    let local = socket
        .local_addr()
        .map_err(|e| format!("cannot find a local address: {e}"))?
        .ip();
    if local.is_loopback() {
        return Err(format!(
            "the API server is reached on this machine's loopback ({target}), where pods cannot reach ccluster's git endpoint: give `--advertise-addr` an address of this machine that the cluster's pods reach"
        ));
    }
    Ok(local.to_string())
}

/// `text` as a label value: itself when Kubernetes allows it, else a hash of it.
fn label_value(text: &str) -> String {
    let ok = !text.is_empty()
        && text.len() <= 63
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && text.starts_with(|c: char| c.is_ascii_alphanumeric())
        && text.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        text.to_string()
    } else {
        label_hash(text)
    }
}

/// A short hash of `text`, fit for a label value.
fn label_hash(text: &str) -> String {
    blake3::hash(text.as_bytes()).to_hex()[..32].to_string()
}

fn random_salt() -> [u8; 32] {
    let mut salt = [0u8; 32];
    for b in salt.iter_mut() {
        *b = fastrand::u8(..);
    }
    salt
}

/// `text` in the alphabet of a DNS label: lowercase letters, digits and `-`.
fn dns_label(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    while out.contains("--") {
        out = out.replace("--", "-");
    }
    out.trim_matches('-').to_string()
}

/// At most 63 characters, ending in a letter or digit.
fn truncate_name(name: &str) -> String {
    let mut n: String = name.chars().take(63).collect();
    while n.ends_with('-') {
        n.pop();
    }
    n
}

/// The Job of an attempt: the same name for the same run, node and attempt (a leftover one is
/// found by it), at most 63 characters, unique through a hash of the node's full name.
pub fn job_name(run: &str, node: &str, attempt: &str) -> String {
    let hash = &blake3::hash(format!("{run}\0{node}").as_bytes()).to_hex()[..8];
    let run = dns_label(run);
    let attempt = dns_label(attempt);
    let fixed = 3 + run.len() + 1 + 8 + 1 + attempt.len();
    let room = 63usize.saturating_sub(fixed + 1);
    let slug: String = dns_label(node).chars().take(room).collect();
    let slug = slug.trim_matches('-');
    let name = if slug.is_empty() {
        format!("cc-{run}-{hash}-{attempt}")
    } else {
        format!("cc-{run}-{slug}-{hash}-{attempt}")
    };
    truncate_name(&name)
}

fn api_error(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({})", s.message, s.code),
        e => e.to_string(),
    }
}

/// What a pod was last seen as, for the attempt that waits for it.
#[derive(Clone, Default)]
struct Seen {
    job: Option<Job>,
    job_gone: bool,
    /// The Job's pods by name; `None`: deleted.
    pods: BTreeMap<String, Option<Pod>>,
}

/// One watch of the runner's Jobs and one of their pods, shared by all attempts: each attempt
/// follows what is seen of its own Job.
struct Hub {
    seen: Mutex<HashMap<String, watch::Sender<Seen>>>,
}

impl Hub {
    fn start(client: kube::Client, namespace: &str, selector: &str) -> Arc<Hub> {
        let hub = Arc::new(Hub {
            seen: Default::default(),
        });
        let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
        let pods: Api<Pod> = Api::namespaced(client, namespace);
        let config = watcher::Config::default().labels(selector);
        let weak = Arc::downgrade(&hub);
        let job_stream = watcher(jobs, config.clone());
        tokio::spawn(Hub::follow(weak.clone(), job_stream, |seen, job, gone| {
            if gone {
                seen.job_gone = true;
            } else {
                seen.job = Some(job);
            }
        }));
        let pod_stream = watcher(pods, config);
        tokio::spawn(Hub::follow(weak, pod_stream, |seen, pod: Pod, gone| {
            let name = pod.metadata.name.clone().unwrap_or_default();
            seen.pods.insert(name, (!gone).then_some(pod));
        }));
        hub
    }

    /// The Job an object belongs to: its own name, or its pod's label.
    fn job_of<K: kube::Resource>(object: &K) -> Option<String> {
        let meta = object.meta();
        meta.labels
            .as_ref()
            .and_then(|l| l.get(LABEL_JOB).cloned())
            .or_else(|| meta.name.clone())
    }

    async fn follow<K, S>(
        hub: std::sync::Weak<Hub>,
        stream: S,
        apply: impl Fn(&mut Seen, K, bool) + Send + 'static,
    ) where
        K: kube::Resource + Clone + Send + 'static,
        S: futures_util::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
    {
        let mut stream = std::pin::pin!(stream);
        // During a relist: the objects seen again; those not seen are gone.
        let mut relisted: Option<std::collections::HashSet<(String, String)>> = None;
        let mut known: std::collections::HashSet<(String, String)> = Default::default();
        while let Some(event) = stream.next().await {
            let Some(hub) = hub.upgrade() else { return };
            let event = match event {
                Ok(e) => e,
                Err(_) => {
                    // The watcher retries by itself; a pause keeps a broken API server from
                    // being asked in a loop.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let (object, gone) = match event {
                watcher::Event::Init => {
                    relisted = Some(Default::default());
                    continue;
                }
                watcher::Event::InitDone => {
                    if let Some(seen_again) = relisted.take() {
                        for (job, name) in known.difference(&seen_again) {
                            hub.update(job, |s| {
                                if s.pods.contains_key(name) {
                                    s.pods.insert(name.clone(), None);
                                } else if job == name {
                                    s.job_gone = true;
                                }
                            });
                        }
                        known = seen_again;
                    }
                    continue;
                }
                watcher::Event::Apply(o) | watcher::Event::InitApply(o) => (o, false),
                watcher::Event::Delete(o) => (o, true),
            };
            let Some(job) = Hub::job_of(&object) else {
                continue;
            };
            let id = (job.clone(), object.meta().name.clone().unwrap_or_default());
            if gone {
                known.remove(&id);
            } else {
                known.insert(id.clone());
                if let Some(r) = &mut relisted {
                    r.insert(id);
                }
            }
            hub.update(&job, |s| apply(s, object, gone));
        }
    }

    fn update(&self, job: &str, change: impl FnOnce(&mut Seen)) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let sender = seen
            .entry(job.to_string())
            .or_insert_with(|| watch::channel(Seen::default()).0);
        sender.send_modify(change);
    }

    fn subscribe(&self, job: &str) -> watch::Receiver<Seen> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.entry(job.to_string())
            .or_insert_with(|| watch::channel(Seen::default()).0)
            .subscribe()
    }

    fn forget(&self, job: &str) {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(job);
    }
}

/// Variables ccluster passes from its own environment that describe this machine, not the pod:
/// dropped (the image's own apply) unless the task set them to something else.
const HOST_ONLY_ENV: &[&str] = &["PATH", "HOME", "USER", "LOGNAME", "TMPDIR"];

/// `value` quoted for `sh`.
fn sh_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// What an attempt's pod does, as `sh` runs it: fetch the workspace (when it travels), run the
/// task with its stderr lines marked (the pod's log merges both streams), push what it made, and
/// exit with the task's status. `"$@"` is the task's program and arguments.
fn pod_script(
    fetch: Option<&str>,
    push: Option<&str>,
    cwd: &str,
    stdin: bool,
    files: &[(String, String)],
    dirs: &[String],
) -> String {
    // Everything the script says on stderr (its own messages, git's, the task's) is marked.
    let mut s = format!(
        "set -u\n\
         e={POD_DIR}/scratch/stderr; mkfifo \"$e\" || exit {TRANSPORT_FAILED}\n\
         (while IFS= read -r l || [ -n \"$l\" ]; do printf '\\036\\036%s\\n' \"$l\"; done < \"$e\") &\n\
         exec 2>\"$e\"\n\
         finish() {{ exec 2>/dev/null; wait; exit \"$1\"; }}\n"
    );
    for dir in dirs {
        s.push_str(&format!(
            "mkdir -p {} || finish {TRANSPORT_FAILED}\n",
            sh_quote(dir)
        ));
    }
    for (key, path) in files {
        let dir = Path::new(path)
            .parent()
            .map_or("/".to_string(), |p| p.display().to_string());
        s.push_str(&format!(
            "mkdir -p {} && cp {POD_DIR}/in/{key} {} || finish {TRANSPORT_FAILED}\n",
            sh_quote(&dir),
            sh_quote(path)
        ));
    }
    if let Some(fetch) = fetch {
        s.push_str(&format!(
            "( {fetch} ) || {{ echo 'ccluster: cannot fetch the workspace' >&2; finish {TRANSPORT_FAILED}; }}\n"
        ));
    }
    s.push_str(&format!(
        "mkdir -p {0} && cd {0} || finish {TRANSPORT_FAILED}\n",
        sh_quote(cwd)
    ));
    let input = if stdin {
        format!("{POD_DIR}/in/stdin")
    } else {
        "/dev/null".into()
    };
    s.push_str(&format!(
        "\"$@\" < {input} & pid=$!\n\
         trap 'kill -TERM $pid 2>/dev/null' TERM INT\n\
         wait $pid; status=$?\n\
         while kill -0 $pid 2>/dev/null; do wait $pid; status=$?; done\n"
    ));
    if let Some(push) = push {
        s.push_str(&format!(
            "if [ \"$status\" = 0 ]; then ( {push} ) || {{ echo 'ccluster: cannot push the workspace' >&2; finish {TRANSPORT_FAILED}; }}; fi\n"
        ));
    }
    // The marker's reader ends when nothing holds the pipe open any more: it is waited for, lest
    // the container stop before the last lines are out.
    s.push_str("finish \"$status\"\n");
    s
}

/// How a Job's pod ended, as far as it can be told from what the watch saw.
#[derive(Debug, PartialEq)]
enum PodEnd {
    /// Still going (or not started yet).
    NotYet,
    Exited(i32),
    OutOfMemory,
    TimedOut,
    Failed(FailureClass, String),
}

/// Reads the Job and its pod as last seen: whether the attempt is over, and how.
fn pod_end(
    seen: &Seen,
    image: &str,
    pending_since: Option<Instant>,
    unschedulable_after: Duration,
) -> PodEnd {
    let deadline = seen
        .job
        .as_ref()
        .and_then(|j| j.status.as_ref())
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter().any(|c| {
                c.type_ == "Failed"
                    && c.status == "True"
                    && c.reason.as_deref() == Some("DeadlineExceeded")
            })
        });
    if deadline {
        return PodEnd::TimedOut;
    }
    // The newest pod is the attempt's (with `backoffLimit: 0` there is one, unless someone
    // deleted it and the Job controller made another).
    let mut pods: Vec<(&String, &Option<Pod>)> = seen.pods.iter().collect();
    pods.sort_by_key(|(_, p)| {
        p.as_ref()
            .and_then(|p| p.metadata.creation_timestamp.clone())
            .map(|t| t.0)
    });
    // A pod going away that ccluster did not delete: the Job's deadline (the Job controller
    // deletes its pods, and may say so only after), or someone else.
    let going = seen.pods.iter().find(|(_, p)| {
        p.as_ref()
            .is_none_or(|p| p.metadata.deletion_timestamp.is_some())
    });
    if let Some((name, _)) = going {
        if past_deadline(seen) {
            return PodEnd::TimedOut;
        }
        // Deleted before it ended (a pod that ended keeps its status until its Job goes).
        return PodEnd::Failed(
            FailureClass::Infra,
            format!(
                "pod {name} was deleted before it ended (by someone else, or the node was lost)"
            ),
        );
    }
    if seen.job_gone {
        return PodEnd::Failed(
            FailureClass::Infra,
            "the attempt's Job was deleted by someone else".into(),
        );
    }
    let Some((name, Some(pod))) = pods.last() else {
        return PodEnd::NotYet;
    };
    let Some(status) = &pod.status else {
        return PodEnd::NotYet;
    };
    let container = status
        .container_statuses
        .as_ref()
        .and_then(|c| c.iter().find(|c| c.name == CONTAINER));
    if let Some(state) = container.and_then(|c| c.state.as_ref()) {
        if let Some(t) = &state.terminated {
            if t.reason.as_deref() == Some("OOMKilled") {
                return PodEnd::OutOfMemory;
            }
            return PodEnd::Exited(t.exit_code);
        }
        if let Some(w) = &state.waiting {
            let reason = w.reason.as_deref().unwrap_or("");
            if matches!(
                reason,
                "ErrImagePull" | "ImagePullBackOff" | "ErrImageNeverPull" | "InvalidImageName"
            ) {
                return PodEnd::Failed(
                    FailureClass::Image,
                    format!(
                        "pod {name} cannot get image `{image}`: {reason}{}",
                        w.message
                            .as_deref()
                            .map(|m| format!(": {m}"))
                            .unwrap_or_default()
                    ),
                );
            }
            if matches!(
                reason,
                "CreateContainerConfigError" | "CreateContainerError"
            ) {
                return PodEnd::Failed(
                    FailureClass::SpawnError,
                    format!(
                        "pod {name} cannot start its container: {reason}{}",
                        w.message
                            .as_deref()
                            .map(|m| format!(": {m}"))
                            .unwrap_or_default()
                    ),
                );
            }
        }
    }
    let reason = status.reason.as_deref().unwrap_or("");
    match (status.phase.as_deref(), reason) {
        (_, "Evicted") => {
            return PodEnd::Failed(
                FailureClass::Infra,
                format!(
                    "pod {name} was evicted: {}",
                    status.message.as_deref().unwrap_or("no reason given")
                ),
            )
        }
        (_, "DeadlineExceeded") => return PodEnd::TimedOut,
        (_, "NodeLost") | (Some("Unknown"), _) => {
            return PodEnd::Failed(
                FailureClass::Infra,
                format!("pod {name}: its node was lost"),
            )
        }
        (Some("Failed"), _) if container.is_none() => {
            return PodEnd::Failed(
                FailureClass::Infra,
                format!(
                    "pod {name} failed before its container started: {reason} {}",
                    status.message.as_deref().unwrap_or("")
                ),
            )
        }
        _ => {}
    }
    let unschedulable = status.conditions.as_ref().and_then(|c| {
        c.iter().find(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
        })
    });
    if let (Some(c), Some(since)) = (unschedulable, pending_since) {
        if since.elapsed() >= unschedulable_after {
            return PodEnd::Failed(
                FailureClass::Unschedulable,
                format!(
                    "pod {name} could not be scheduled for {}: {}",
                    humantime::format_duration(unschedulable_after),
                    c.message
                        .as_deref()
                        .unwrap_or("the scheduler gave no reason")
                ),
            );
        }
    }
    PodEnd::NotYet
}

/// Whether the Job has run for as long as its `activeDeadlineSeconds`.
fn past_deadline(seen: &Seen) -> bool {
    let Some(job) = &seen.job else { return false };
    let deadline = job.spec.as_ref().and_then(|s| s.active_deadline_seconds);
    let started = job.status.as_ref().and_then(|s| s.start_time.as_ref());
    match (deadline, started) {
        (Some(d), Some(t)) => {
            let elapsed = k8s_openapi::jiff::Timestamp::now().duration_since(t.0);
            elapsed.as_secs() >= d - 1
        }
        _ => false,
    }
}

/// Whether the pod's container has started (its log can be read).
fn container_started(seen: &Seen) -> Option<String> {
    seen.pods.iter().rev().find_map(|(name, pod)| {
        let started = pod
            .as_ref()?
            .status
            .as_ref()?
            .container_statuses
            .as_ref()?
            .iter()
            .any(|c| {
                c.name == CONTAINER
                    && c.state
                        .as_ref()
                        .is_some_and(|s| s.running.is_some() || s.terminated.is_some())
            });
        started.then(|| name.clone())
    })
}

/// Whether the pod is waiting to be scheduled.
fn unschedulable(seen: &Seen) -> bool {
    seen.pods.values().flatten().any(|p| {
        p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| {
                c.iter().any(|c| {
                    c.type_ == "PodScheduled"
                        && c.status == "False"
                        && c.reason.as_deref() == Some("Unschedulable")
                })
            })
    })
}

/// The attempt a process belongs to: its identity, or (for a process made by hand) its
/// `CCLUSTER_*` variables.
fn attempt_of(spec: &ProcessSpec) -> (String, String, String) {
    if let Some(id) = &spec.identity {
        return (id.run.clone(), id.node.clone(), id.attempt.to_string());
    }
    let var = |name: &str| {
        spec.env
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map_or(String::new(), |(_, v)| v.clone())
    };
    (
        var("CCLUSTER_RUN"),
        var("CCLUSTER_TASK"),
        var("CCLUSTER_ATTEMPT"),
    )
}

/// Whether `url`'s host is this machine's loopback: a pod cannot reach it.
fn on_loopback(url: &str) -> bool {
    let Some(host) = super::egress::Allow::host_of_url(url) else {
        return false;
    };
    let host = match host.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => h.to_string(),
        _ => host,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The variable of the pod's git token (from the run's Secret).
const TOKEN_VAR: &str = "CCLUSTER_GIT_TOKEN";

/// What a pod's workspace is: the commit it starts from, and where it pushes.
struct Travel {
    workspace: PathBuf,
    start: String,
    result_name: String,
}

/// A commit of the workspace as it is now (tracked and untracked files, what `.gitignore`
/// leaves out excepted) on top of its `HEAD`, made with a scratch index: the worktree's own
/// index and `HEAD` are not touched.
fn snapshot(workspace: &Path, scratch: &Path) -> Result<String, String> {
    let git = |args: &[&str]| -> Result<String, String> {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(workspace)
            .args(args)
            .env("GIT_INDEX_FILE", scratch)
            .env("GIT_AUTHOR_NAME", "ccluster")
            .env("GIT_AUTHOR_EMAIL", "ccluster@localhost")
            .env("GIT_COMMITTER_NAME", "ccluster")
            .env("GIT_COMMITTER_EMAIL", "ccluster@localhost")
            .output()
            .map_err(|e| format!("cannot run git: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "git {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let _ = std::fs::remove_file(scratch);
    let result = (|| {
        git(&["read-tree", "HEAD"])?;
        git(&["add", "-A", "."])?;
        let tree = git(&["write-tree"])?;
        git(&[
            "commit-tree",
            &tree,
            "-p",
            "HEAD",
            "-m",
            "ccluster: the workspace an attempt starts from",
        ])
    })();
    let _ = std::fs::remove_file(scratch);
    result
}

/// Applies the changes of `result` (a pod's push) over `start` to the worktree's files.
fn apply_result(workspace: &Path, start: &str, result: &str) -> Result<(), String> {
    if start == result {
        return Ok(());
    }
    let diff = std::process::Command::new("git")
        .arg("-C")
        .arg(workspace)
        .args(["diff", "--binary", "--no-renames", start, result])
        .output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if !diff.status.success() {
        return Err(format!(
            "cannot read what the pod changed: {}",
            String::from_utf8_lossy(&diff.stderr).trim()
        ));
    }
    if diff.stdout.is_empty() {
        return Ok(());
    }
    use std::io::Write;
    let mut apply = std::process::Command::new("git")
        .arg("-C")
        .arg(workspace)
        .args(["apply", "--whitespace=nowarn", "--unidiff-zero", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if let Some(mut input) = apply.stdin.take() {
        input
            .write_all(&diff.stdout)
            .map_err(|e| format!("cannot apply what the pod changed: {e}"))?;
    }
    let out = apply
        .wait_with_output()
        .map_err(|e| format!("cannot apply what the pod changed: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cannot apply what the pod changed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Files sent to a pod (path and contents), and the directories to make for it.
type Inputs = (Vec<(PathBuf, Vec<u8>)>, Vec<PathBuf>);

/// Files an isolated process reads or writes, sent to its pod: the contents of its own
/// directories (an agent worker's settings and config) and the small files it reads, by path.
/// The `claude` CLI itself is the image's. Credentials files are not sent.
fn files_of(spec: &ProcessSpec, program: Option<&str>) -> Result<Inputs, String> {
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    let mut add = |path: &Path| -> Result<(), String> {
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
        files.push((path.to_path_buf(), bytes));
        Ok(())
    };
    for path in &spec.reads {
        if Some(path.display().to_string().as_str()) == program || path.is_dir() {
            continue;
        }
        add(path)?;
    }
    for dir in &spec.writes {
        let mut stack = vec![dir.clone()];
        while let Some(d) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let path = e.path();
                let Ok(kind) = e.file_type() else { continue };
                if kind.is_dir() {
                    dirs.push(path.clone());
                    stack.push(path);
                } else if kind.is_file() && e.file_name() != ".credentials.json" {
                    add(&path)?;
                }
            }
        }
    }
    Ok((files, dirs))
}

/// The most a ConfigMap may hold (the API server's limit on an object is about 1.5 MB).
const MAX_INPUTS: usize = 1 << 20;

impl Runner for KubernetesRunner {
    fn run(&self, spec: ProcessSpec, stop: watch::Receiver<Stop>) -> ProcessFuture {
        let inner = self.inner.clone();
        Box::pin(async move {
            match inner.run(spec, stop).await {
                Ok(result) => result,
                Err(e) => ProcessResult {
                    end: ProcessEnd::SpawnFailed(e),
                    stdout: Vec::new(),
                },
            }
        })
    }

    fn recover(
        &self,
        state_dir: &Path,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<PathBuf>> + Send + '_>> {
        let state_dir = state_dir.to_path_buf();
        Box::pin(async move { self.inner.recover(&state_dir).await })
    }

    fn adopt(&self, node: &str, key: &str) -> Option<super::runner::Adopted> {
        let mut kept = self.inner.kept.lock().unwrap_or_else(|e| e.into_inner());
        let i = kept.iter().position(|k| {
            k.node == node && k.key == key && k.workspace.as_ref().is_none_or(|w| w.is_dir())
        })?;
        let k = kept.remove(i);
        Some(super::runner::Adopted {
            handle: k.name,
            workspace: k.workspace,
        })
    }

    fn release(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move { self.inner.release().await })
    }
}

/// How an attempt's pod is set up, before its Job is made.
struct Prepared {
    job: Job,
    inputs: Option<ConfigMap>,
    travel: Option<Travel>,
}

impl Inner {
    fn state_of(&self, spec: &ProcessSpec) -> PathBuf {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(id) = &spec.identity {
            state.get_or_insert_with(|| id.state_dir.clone());
        }
        state.clone().unwrap_or_else(|| PathBuf::from(".ccluster"))
    }

    async fn run(
        self: Arc<Self>,
        spec: ProcessSpec,
        stop: watch::Receiver<Stop>,
    ) -> Result<ProcessResult, String> {
        let state = self.state_of(&spec);
        let hub = self.hub(&state).await;
        let (run, node, attempt) = attempt_of(&spec);
        if let Some(name) = spec.adopt.clone() {
            if let Some(id) = &spec.identity {
                id.notice(
                    "adopted",
                    format!(
                        "the Job {name}, left by a killed ccluster: its work is not done again"
                    ),
                );
            }
            let travel = self.travel_of_kept(&name).await;
            return Ok(self.supervise(&hub, name, travel, spec, stop).await);
        }
        let name = job_name(&run, &node, &attempt);
        let prepared = match self
            .prepare(&spec, &state, &run, &node, &attempt, &name)
            .await
        {
            Ok(p) => p,
            Err(Unstartable(e)) => {
                return Ok(ProcessResult {
                    end: ProcessEnd::Unstartable(e),
                    stdout: Vec::new(),
                })
            }
        };
        let jobs = self.jobs();
        let configmaps: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        if let Some(cm) = &prepared.inputs {
            let cm_name = cm.metadata.name.clone().unwrap_or_default();
            let _ = configmaps.delete(&cm_name, &DeleteParams::default()).await;
            configmaps
                .create(&PostParams::default(), cm)
                .await
                .map_err(|e| format!("cannot make ConfigMap `{cm_name}`: {}", api_error(&e)))?;
        }
        let created = jobs.create(&PostParams::default(), &prepared.job).await;
        let uid = match created {
            Ok(job) => job.metadata.uid,
            // The Job exists: the same attempt, made by a ccluster that was killed before it
            // could record it. Its work is this attempt's.
            Err(kube::Error::Api(s)) if s.code == 409 => {
                if let Some(id) = &spec.identity {
                    id.notice(
                        "adopted",
                        format!("the Job {name} exists already (made for this attempt before ccluster was killed): it is followed, not made again"),
                    );
                }
                jobs.get(&name).await.ok().and_then(|j| j.metadata.uid)
            }
            Err(e) => {
                return Err(format!("cannot make Job `{name}`: {}", api_error(&e)));
            }
        };
        // The inputs go when the Job goes.
        if let (Some(cm), Some(uid)) = (&prepared.inputs, uid) {
            let owner = serde_json::json!({"metadata": {"ownerReferences": [OwnerReference {
                api_version: "batch/v1".into(),
                kind: "Job".into(),
                name: name.clone(),
                uid,
                ..Default::default()
            }]}});
            let _ = configmaps
                .patch(
                    cm.metadata.name.as_deref().unwrap_or_default(),
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&owner),
                )
                .await;
        }
        Ok(self
            .supervise(&hub, name, prepared.travel, spec, stop)
            .await)
    }

    /// For an adopted Job: where its workspace came from and goes (its annotations).
    async fn travel_of_kept(&self, name: &str) -> Option<Travel> {
        let job = self.jobs().get(name).await.ok()?;
        let notes = job.metadata.annotations?;
        Some(Travel {
            workspace: PathBuf::from(notes.get(NOTE_WORKSPACE)?),
            start: notes.get(NOTE_START)?.clone(),
            result_name: name.to_string(),
        })
    }

    async fn prepare(
        &self,
        spec: &ProcessSpec,
        state: &Path,
        run: &str,
        node: &str,
        attempt: &str,
        name: &str,
    ) -> Result<Prepared, Unstartable> {
        let mut argv = match &spec.argv {
            Some(argv) => argv.clone(),
            None => vec!["/bin/sh".into(), "-c".into(), spec.command.clone()],
        };
        // An agent's CLI is the image's own `claude`, found on its PATH.
        let program = argv.first().cloned();
        if let Some(first) = argv.first_mut() {
            if spec.reads.iter().any(|r| r.display().to_string() == *first) {
                *first = "claude".into();
            }
        }
        // The runner's `env` first, then the task's own: what the task declares wins.
        let mut pairs: Vec<(String, String)> = self
            .settings
            .env
            .iter()
            .filter(|(k, _)| !spec.env.iter().any(|(name, _)| name == *k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        pairs.extend(spec.env.iter().cloned());
        pairs.retain(|(k, v)| {
            !(HOST_ONLY_ENV.contains(&k.as_str()) && std::env::var(k).is_ok_and(|h| h == *v))
        });
        if !pairs.iter().any(|(k, _)| k == "HOME") {
            if let Some(dir) = spec.writes.first() {
                pairs.push(("HOME".into(), dir.display().to_string()));
            }
        }
        let mut secret_names: Vec<String> = spec.secret_env.clone();
        // The workspace travels by git when it is one of the run's worktrees; a model API only
        // this machine reaches is relayed. Both through the run's endpoint.
        let worktree = spec
            .workspace
            .as_ref()
            .filter(|ws| ws.starts_with(state.join("worktrees")) && ws.join(".git").exists());
        let relayed_api = spec.model_api.as_deref().filter(|a| on_loopback(a));
        let endpoint = match (worktree.or(spec.workspace.as_ref()), worktree.is_some() || relayed_api.is_some()) {
            (Some(repo_dir), true) => Some(
                self.endpoint(run, state, repo_dir)
                    .await
                    .map_err(Unstartable)?,
            ),
            (None, true) => {
                return Err(Unstartable(format!(
                    "the model API at {} is on this machine's loopback, which pods cannot reach, and the task has no repository to relay it from",
                    relayed_api.unwrap_or_default()
                )))
            }
            _ => None,
        };
        let mut relay = false;
        if let (Some(api), Some(ep)) = (relayed_api, &endpoint) {
            let url = ep.relay(api).map_err(Unstartable)?;
            for (k, v) in pairs.iter_mut() {
                if k == "ANTHROPIC_BASE_URL" {
                    *v = url.clone();
                }
            }
            // The relay's URL carries the run's token.
            secret_names.push("ANTHROPIC_BASE_URL".into());
            relay = true;
        }
        let mut travel = None;
        let mut fetch = None;
        let mut push = None;
        if let (Some(ws), Some(ep)) = (worktree, &endpoint) {
            let scratch = state.join("tmp").join(format!("{name}.index"));
            let _ = std::fs::create_dir_all(state.join("tmp"));
            let start = snapshot(ws, &scratch).map_err(Unstartable)?;
            let start_ref = ep.offer(name, &start).map_err(Unstartable)?;
            let dir = ws.display().to_string();
            fetch = Some(super::endpoint::fetch_script(
                &ep.git_url(),
                TOKEN_VAR,
                &start_ref,
                &dir,
            ));
            push = Some(super::endpoint::push_script(
                &ep.git_url(),
                TOKEN_VAR,
                run,
                name,
                &dir,
            ));
            pairs.push((TOKEN_VAR.into(), ep.token().to_string()));
            secret_names.push(TOKEN_VAR.into());
            travel = Some(Travel {
                workspace: ws.clone(),
                start,
                result_name: name.to_string(),
            });
        }
        // Credentials through the run's Secret, everything else as plain values.
        let (secret, plain): (Vec<_>, Vec<_>) = pairs
            .into_iter()
            .partition(|(k, _)| secret_names.contains(k));
        let (secret_name, keys) = self
            .secret_keys(run, state, &secret)
            .await
            .map_err(Unstartable)?;
        let mut env: Vec<EnvVar> = plain
            .into_iter()
            .map(|(k, v)| EnvVar {
                name: k,
                value: Some(v),
                ..Default::default()
            })
            .collect();
        for ((k, _), key) in secret.into_iter().zip(keys) {
            env.push(EnvVar {
                name: k,
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: secret_name.clone(),
                        key,
                        optional: Some(false),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        // Inputs: stdin and the process's small files, in a ConfigMap of the attempt.
        let (files, dirs) = files_of(spec, program.as_deref()).map_err(Unstartable)?;
        let mut data = BTreeMap::new();
        let mut placed = Vec::new();
        for (i, (path, bytes)) in files.into_iter().enumerate() {
            let key = format!("f{i}");
            placed.push((key.clone(), path.display().to_string()));
            data.insert(key, ByteString(bytes));
        }
        if let Some(stdin) = &spec.stdin {
            data.insert("stdin".into(), ByteString(stdin.clone()));
        }
        let size: usize = data.values().map(|b| b.0.len()).sum();
        if size > MAX_INPUTS {
            return Err(Unstartable(format!(
                "the attempt's input (its prompt and its files: {} KiB) is more than the {} KiB a pod can be given",
                size >> 10,
                MAX_INPUTS >> 10
            )));
        }
        let inputs_name = format!("{}-in", truncate_name(&name[..name.len().min(59)]));
        let cwd = spec.cwd.display().to_string();
        let dirs: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        let script = pod_script(
            fetch.as_deref(),
            push.as_deref(),
            &cwd,
            spec.stdin.is_some(),
            &placed,
            &dirs,
        );
        let mut command = vec![
            "/bin/sh".to_string(),
            "-c".into(),
            script,
            "ccluster-attempt".into(),
        ];
        command.extend(argv);
        // The workspace (or the working directory) is the pod's own empty directory at the same
        // path; the inputs and scratch space under /ccluster.
        let mut mounts = vec![VolumeMount {
            name: "scratch".into(),
            mount_path: format!("{POD_DIR}/scratch"),
            ..Default::default()
        }];
        let mut volumes = vec![Volume {
            name: "scratch".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        }];
        let work_dir = travel
            .as_ref()
            .map(|t| t.workspace.display().to_string())
            .unwrap_or_else(|| cwd.clone());
        mounts.push(VolumeMount {
            name: "work".into(),
            mount_path: work_dir,
            ..Default::default()
        });
        volumes.push(Volume {
            name: "work".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        });
        for (i, dir) in spec.writes.iter().enumerate() {
            mounts.push(VolumeMount {
                name: format!("writes-{i}"),
                mount_path: dir.display().to_string(),
                ..Default::default()
            });
            volumes.push(Volume {
                name: format!("writes-{i}"),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Default::default()
            });
        }
        if !data.is_empty() {
            mounts.push(VolumeMount {
                name: "inputs".into(),
                mount_path: format!("{POD_DIR}/in"),
                read_only: Some(true),
                ..Default::default()
            });
            volumes.push(Volume {
                name: "inputs".into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: inputs_name.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        let mut labels = self.labels(state, run);
        labels.insert(LABEL_NODE.into(), label_hash(node));
        labels.insert(LABEL_ATTEMPT.into(), label_value(attempt));
        labels.insert(LABEL_JOB.into(), name.to_string());
        let network = self
            .settings
            .network
            .unwrap_or(if spec.model_api.is_some() {
                NetworkMode::ApiOnly
            } else {
                NetworkMode::Bridge
            });
        let mut pod_labels = labels.clone();
        pod_labels.insert(LABEL_NETWORK.into(), network.name().into());
        if network != NetworkMode::Bridge {
            self.network_policy(
                run,
                state,
                network,
                endpoint.as_deref(),
                spec.model_api.as_deref(),
            )
            .await
            .map_err(Unstartable)?;
        }
        let mut notes: BTreeMap<String, String> = self
            .settings
            .annotations
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        notes.insert(NOTE_NODE.into(), node.to_string());
        notes.insert(NOTE_STATE.into(), state.display().to_string());
        if let Some(key) = spec.identity.as_ref().and_then(|i| i.cache_key.clone()) {
            notes.insert(NOTE_KEY.into(), key);
        }
        if let Some(t) = &travel {
            notes.insert(NOTE_WORKSPACE.into(), t.workspace.display().to_string());
            notes.insert(NOTE_START.into(), t.start.clone());
        }
        if relay {
            notes.insert(NOTE_RELAY.into(), "true".into());
        }
        let quantities = |m: &indexmap::IndexMap<String, String>| {
            (!m.is_empty()).then(|| {
                m.iter()
                    .map(|(k, v)| (k.clone(), Quantity(v.clone())))
                    .collect::<BTreeMap<_, _>>()
            })
        };
        let container = Container {
            name: CONTAINER.into(),
            image: Some(self.image.clone()),
            image_pull_policy: Some(
                match self.settings.pull {
                    PullPolicy::Never => "Never",
                    PullPolicy::Missing => "IfNotPresent",
                    PullPolicy::Always => "Always",
                }
                .into(),
            ),
            command: Some(command),
            env: Some(env),
            working_dir: Some("/".into()),
            resources: Some(ResourceRequirements {
                requests: quantities(&self.settings.requests),
                limits: quantities(&self.settings.limits),
                ..Default::default()
            }),
            volume_mounts: Some(mounts),
            ..Default::default()
        };
        let grace = i64::try_from(spec.grace.as_secs().max(1)).unwrap_or(30);
        let pod = PodSpec {
            restart_policy: Some("Never".into()),
            containers: vec![container],
            volumes: Some(volumes),
            service_account_name: self.settings.service_account.clone(),
            // A task has no business with the cluster's API.
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            node_selector: (!self.settings.node_selector.is_empty()).then(|| {
                self.settings
                    .node_selector
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            }),
            tolerations: (!self.settings.tolerations.is_empty()).then(|| {
                self.settings
                    .tolerations
                    .iter()
                    .map(|t| Toleration {
                        key: t.key.clone(),
                        operator: t.operator.clone(),
                        value: t.value.clone(),
                        effect: t.effect.clone(),
                        toleration_seconds: t.toleration_seconds,
                    })
                    .collect()
            }),
            image_pull_secrets: (!self.settings.image_pull_secrets.is_empty()).then(|| {
                self.settings
                    .image_pull_secrets
                    .iter()
                    .map(|n| LocalObjectReference { name: n.clone() })
                    .collect()
            }),
            termination_grace_period_seconds: Some(grace),
            ..Default::default()
        };
        let job = Job {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                labels: Some(labels),
                annotations: Some(notes.clone()),
                ..Default::default()
            },
            spec: Some(JobSpec {
                // Retries are ccluster's, with its classes and backoff.
                backoff_limit: Some(0),
                active_deadline_seconds: spec.timeout.map(|t| {
                    i64::try_from(t.as_secs_f64().ceil() as u64)
                        .unwrap_or(i64::MAX)
                        .max(1)
                }),
                ttl_seconds_after_finished: self
                    .settings
                    .ttl_seconds_after_finished
                    .map(|t| t as i32),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(pod_labels),
                        annotations: Some(notes),
                        ..Default::default()
                    }),
                    spec: Some(pod),
                },
                ..Default::default()
            }),
            ..Default::default()
        };
        let inputs = (!data.is_empty()).then(|| ConfigMap {
            metadata: ObjectMeta {
                name: Some(inputs_name),
                labels: Some(self.labels(state, run)),
                ..Default::default()
            },
            binary_data: Some(data),
            ..Default::default()
        });
        Ok(Prepared {
            job,
            inputs,
            travel,
        })
    }
}

/// Why an attempt cannot be started as it stands (not retried).
struct Unstartable(String);

/// A line of the pod's log, split back into the task's stdout and stderr.
fn split_line(line: &[u8]) -> (&[u8], Option<&[u8]>) {
    let mark = STDERR_MARK.as_bytes();
    match line.windows(mark.len()).position(|w| w == mark) {
        Some(i) => (&line[..i], Some(&line[i + mark.len()..])),
        None => (line, None),
    }
}

impl Inner {
    /// Follows the Job `name` until its pod ends (or its time is up, or the run is cancelled:
    /// then the Job is deleted), streaming the pod's log to the attempt's logs; takes back the
    /// workspace it pushed; deletes the Job.
    async fn supervise(
        &self,
        hub: &Hub,
        name: String,
        travel: Option<Travel>,
        spec: ProcessSpec,
        mut stop: watch::Receiver<Stop>,
    ) -> ProcessResult {
        let mut seen = hub.subscribe(&name);
        let mut guard = JobGuard {
            jobs: self.jobs(),
            name: name.clone(),
            armed: true,
        };
        let mut out_log = LazyLog::new(spec.stdout.clone());
        let mut err_log = LazyLog::new(spec.stderr.clone());
        let mut lines = LineSplitter::default();
        let mut kept: Vec<u8> = Vec::new();
        // A backstop for a deadline the cluster does not enforce: the Job's own plus a minute.
        let backstop = spec
            .timeout
            .map(|t| Instant::now() + t + Duration::from_secs(60));
        let (log_tx, mut log_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(256);
        let mut log_task: Option<tokio::task::JoinHandle<()>> = None;
        let mut log_open = true;
        let mut decided: Option<ProcessEnd> = None;
        let mut ended: Option<PodEnd> = None;
        let mut drain_until: Option<Instant> = None;
        let mut pending_since: Option<Instant> = None;
        let mut stop_open = true;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            if ended.is_some() && (!log_open || log_task.is_none()) {
                break;
            }
            tokio::select! {
                changed = seen.changed(), if ended.is_none() => {
                    if changed.is_err() {
                        ended = Some(PodEnd::Failed(FailureClass::Infra, "the runner stopped watching the Job".into()));
                        continue;
                    }
                    let now = seen.borrow_and_update().clone();
                    if log_task.is_none() {
                        if let Some(pod) = container_started(&now) {
                            log_task = Some(self.stream_log(pod, log_tx.clone()));
                        }
                    }
                    if unschedulable(&now) {
                        pending_since.get_or_insert_with(Instant::now);
                    } else {
                        pending_since = None;
                    }
                    let end = pod_end(&now, &self.image, pending_since, self.settings.unschedulable_timeout);
                    if end != PodEnd::NotYet {
                        // A failure that is not the task's own: the pod goes now.
                        if matches!(end, PodEnd::Failed(..)) {
                            delete_job(&self.jobs(), &name, None).await;
                        }
                        drain_until = Some(Instant::now() + DRAIN_AFTER_EXIT);
                        ended = Some(end);
                    }
                }
                chunk = log_rx.recv(), if log_open && log_task.is_some() => match chunk {
                    Some(line) => {
                        let (out, err) = split_line(&line);
                        let out_part: Vec<u8> = if err.is_some() { out.to_vec() } else { line.clone() };
                        if !out_part.is_empty() {
                            out_log.write(&out_part);
                            if let Some(tx) = &spec.lines {
                                lines.push(&out_part, |l| { let _ = tx.send(l); });
                            }
                            kept.extend_from_slice(&out_part);
                            if kept.len() > 2 * super::runner::STDOUT_KEPT {
                                kept.drain(..kept.len() - super::runner::STDOUT_KEPT);
                            }
                        }
                        if let Some(err) = err {
                            err_log.write(err);
                        }
                    }
                    None => log_open = false,
                },
                _ = tick.tick(), if ended.is_none() && pending_since.is_some() => {
                    let now = seen.borrow().clone();
                    let end = pod_end(&now, &self.image, pending_since, self.settings.unschedulable_timeout);
                    if matches!(end, PodEnd::Failed(..)) {
                        delete_job(&self.jobs(), &name, None).await;
                        drain_until = Some(Instant::now() + DRAIN_AFTER_EXIT);
                        ended = Some(end);
                    }
                }
                _ = async { match drain_until { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => break,
                _ = async { match backstop { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } }, if ended.is_none() => {
                    delete_job(&self.jobs(), &name, Some(spec.grace)).await;
                    ended = Some(PodEnd::TimedOut);
                    drain_until = Some(Instant::now() + DRAIN_AFTER_EXIT);
                }
                changed = stop.changed(), if stop_open && ended.is_none() => {
                    if changed.is_err() {
                        stop_open = false;
                        continue;
                    }
                    let level = *stop.borrow();
                    if level == Stop::No {
                        continue;
                    }
                    let grace = if level == Stop::Now { Duration::ZERO } else { spec.grace };
                    delete_job(&self.jobs(), &name, Some(grace)).await;
                    if level == Stop::Now {
                        self.delete_pods(&name).await;
                    }
                    decided = Some(ProcessEnd::Cancelled);
                    ended = Some(PodEnd::NotYet);
                    drain_until = Some(Instant::now() + grace + DRAIN_AFTER_EXIT);
                }
            }
        }
        if let Some(task) = log_task {
            task.abort();
        }
        // Stdout may end without a newline.
        if let Some(tx) = &spec.lines {
            lines.finish(|l| {
                let _ = tx.send(l);
            });
        }
        let mut end = match (decided, ended) {
            (Some(end), _) => end,
            (None, Some(PodEnd::Exited(TRANSPORT_FAILED))) if travel.is_some() => {
                ProcessEnd::Failed(
                    FailureClass::Infra,
                    "the pod could not fetch or push its workspace through ccluster's git endpoint (see its stderr)".into(),
                )
            }
            (None, Some(PodEnd::Exited(code))) => ProcessEnd::Exited(code),
            (None, Some(PodEnd::OutOfMemory)) => ProcessEnd::OutOfMemory,
            (None, Some(PodEnd::TimedOut)) => ProcessEnd::TimedOut,
            (None, Some(PodEnd::Failed(class, message))) => ProcessEnd::Failed(class, message),
            (None, Some(PodEnd::NotYet) | None) => ProcessEnd::Exited(-1),
        };
        // What the pod made comes back into the worktree.
        if let (ProcessEnd::Exited(0), Some(t)) = (&end, &travel) {
            let taken = match self.endpoint.get() {
                Some(Ok(ep)) => ep
                    .take(&t.result_name)
                    .and_then(|r| r.ok_or_else(|| "the pod pushed nothing".to_string()))
                    .and_then(|result| {
                        apply_result(&t.workspace, &t.start, &result)?;
                        // The pushed commit was only a carrier: the attempt's commit is made
                        // from the worktree, as on any runner.
                        let _ = crate::workspace::git_sync(
                            &t.workspace,
                            &["update-ref", "-d", &ep.result_ref(&t.result_name)],
                        );
                        Ok(())
                    }),
                _ => Err("the run's endpoint is not running".to_string()),
            };
            if let Err(e) = taken {
                end = ProcessEnd::Failed(
                    FailureClass::Infra,
                    format!("cannot take back the pod's workspace: {e}"),
                );
            }
        }
        // A finished Job stays when the runner keeps them for a while (`ttl_seconds_after_finished`).
        if self.settings.ttl_seconds_after_finished.is_none() || end == ProcessEnd::Cancelled {
            delete_job(&self.jobs(), &name, None).await;
        }
        guard.armed = false;
        hub.forget(&name);
        if kept.len() > super::runner::STDOUT_KEPT {
            kept.drain(..kept.len() - super::runner::STDOUT_KEPT);
        }
        ProcessResult { end, stdout: kept }
    }

    /// Streams the container's log, line by line, to `tx` until it ends.
    fn stream_log(
        &self,
        pod: String,
        tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    ) -> tokio::task::JoinHandle<()> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        tokio::spawn(async move {
            let params = LogParams {
                container: Some(CONTAINER.into()),
                follow: true,
                ..Default::default()
            };
            let Ok(stream) = pods.log_stream(&pod, &params).await else {
                return;
            };
            let mut stream = std::pin::pin!(stream);
            loop {
                let mut line = Vec::new();
                match stream.read_until(b'\n', &mut line).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        if tx.send(line).await.is_err() {
                            return;
                        }
                    }
                }
            }
        })
    }

    async fn delete_pods(&self, job: &str) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        };
        let _ = pods
            .delete_collection(
                &params,
                &ListParams::default().labels(&format!("{LABEL_JOB}={job}")),
            )
            .await;
    }

    /// Finds the Jobs this runner made for the state directory (their ccluster died: we hold
    /// the state's lock). A finished Job, or a running one that does not depend on the dead
    /// ccluster (its model relay), is kept for an attempt of its node and cache key to adopt;
    /// the rest are deleted.
    async fn recover(&self, state_dir: &Path) -> Vec<PathBuf> {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = Some(state_dir.to_path_buf());
        let jobs = self.jobs();
        let Ok(found) = jobs
            .list(&ListParams::default().labels(&self.selector(state_dir)))
            .await
        else {
            return Vec::new();
        };
        let mut kept: Vec<KeptJob> = Vec::new();
        for job in found.items {
            let Some(name) = job.metadata.name.clone() else {
                continue;
            };
            let notes = job.metadata.annotations.clone().unwrap_or_default();
            let status = job.status.clone().unwrap_or_default();
            let finished = status.succeeded.unwrap_or(0) > 0 || status.failed.unwrap_or(0) > 0;
            let relayed = notes.contains_key(NOTE_RELAY);
            let adoptable = finished || !relayed;
            match (notes.get(NOTE_KEY), notes.get(NOTE_NODE), adoptable) {
                (Some(key), Some(node), true) => kept.push(KeptJob {
                    name,
                    node: node.clone(),
                    key: key.clone(),
                    workspace: notes.get(NOTE_WORKSPACE).map(PathBuf::from),
                }),
                _ => delete_job(&jobs, &name, None).await,
            }
        }
        let workspaces = kept.iter().filter_map(|k| k.workspace.clone()).collect();
        *self.kept.lock().unwrap_or_else(|e| e.into_inner()) = kept;
        workspaces
    }

    /// The run is ending: Jobs nothing adopted, and the run's Secrets, go.
    async fn release(&self) {
        self.kept.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let runs: Vec<String> = self
            .secrets
            .lock()
            .await
            .drain()
            .map(|(run, _)| run)
            .collect();
        self.policies.lock().await.clear();
        if let Some(state) = &state {
            for run in runs {
                // No pod of the run can push any more: its transport repository goes.
                let _ = std::fs::remove_dir_all(state.join("transport").join(format!("{run}.git")));
            }
            // We hold the state's lock: whatever of this state and runner is left (Jobs nothing
            // adopted, the run's Secret and NetworkPolicies, and those a killed ccluster left)
            // is no run's any more. Finished Jobs the runner keeps for a while stay.
            self.sweep(state, self.settings.ttl_seconds_after_finished.is_none())
                .await;
        }
    }

    /// Deletes what the runner made for the state directory: Secrets, ConfigMaps,
    /// NetworkPolicies, and Jobs (with their pods) unless `jobs` is false.
    pub(crate) async fn sweep(&self, state: &Path, jobs: bool) -> usize {
        let selector = ListParams::default().labels(&self.selector(state));
        let mut deleted = 0;
        if jobs {
            if let Ok(found) = self.jobs().list(&selector).await {
                for job in found.items {
                    if let Some(name) = job.metadata.name {
                        delete_job(&self.jobs(), &name, None).await;
                        deleted += 1;
                    }
                }
            }
        }
        let params = DeleteParams::default();
        macro_rules! sweep_kind {
            ($kind:ty) => {{
                let api: Api<$kind> = Api::namespaced(self.client.clone(), &self.namespace);
                if let Ok(found) = api.list(&selector).await {
                    for item in found.items {
                        if let Some(name) = item.metadata.name {
                            if api.delete(&name, &params).await.is_ok() {
                                deleted += 1;
                            }
                        }
                    }
                }
            }};
        }
        sweep_kind!(Secret);
        sweep_kind!(ConfigMap);
        sweep_kind!(k8s_openapi::api::networking::v1::NetworkPolicy);
        deleted
    }
}

/// Deletes a Job and (in the background) its pods, which get `grace` to stop (`None`: their own
/// termination grace period).
async fn delete_job(jobs: &Api<Job>, name: &str, grace: Option<Duration>) {
    let params = DeleteParams {
        // Kubernetes 1.20 orphans a Job's pods unless told otherwise.
        propagation_policy: Some(PropagationPolicy::Background),
        grace_period_seconds: grace.map(|g| g.as_secs() as u32),
        ..Default::default()
    };
    let _ = jobs.delete(name, &params).await;
}

/// Deletes the Job if the supervising future is dropped before it ended: no task outlives its
/// supervisor.
struct JobGuard {
    jobs: Api<Job>,
    name: String,
    armed: bool,
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (jobs, name) = (self.jobs.clone(), self.name.clone());
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move { delete_job(&jobs, &name, None).await });
        }
    }
}
