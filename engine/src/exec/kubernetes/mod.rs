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

mod names;
mod pod;
mod seen;
mod travel;

use names::*;
use pod::*;
use seen::*;
use travel::*;

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
pub const NOTE_RUN: &str = "ccluster.dev/run";
pub const NOTE_KEY: &str = "ccluster.dev/key";
pub const NOTE_WORKSPACE: &str = "ccluster.dev/workspace";
pub const NOTE_STATE: &str = "ccluster.dev/state";
/// The commit a pod's workspace starts from (the result's parent).
pub const NOTE_START: &str = "ccluster.dev/start";
/// The pod talks to its model API through the driver's relay: it cannot outlive the driver.
pub const NOTE_RELAY: &str = "ccluster.dev/relay";
/// On a finished Job a run left to its `ttl_seconds_after_finished`: no later run adopts it.
pub const LABEL_RELEASED: &str = "ccluster.dev/released";

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
    /// By run: this run's, and a killed run's whose Jobs this one adopts.
    carriers: tokio::sync::Mutex<HashMap<String, Arc<Carrier>>>,
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
                carriers: Default::default(),
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
    ) -> Result<Arc<Carrier>, String> {
        let mut carriers = self.carriers.lock().await;
        if let Some(carrier) = carriers.get(run) {
            return Ok(carrier.clone());
        }
        let carrier = Arc::new(match &self.settings.remote {
            Some(remote) => Remote::new(repo_dir, remote, run).map(Carrier::Remote)?,
            None => self
                .start_endpoint(run, state, repo_dir)
                .await
                .map(Carrier::Endpoint)?,
        });
        carriers.insert(run.to_string(), carrier.clone());
        Ok(carrier)
    }

    /// The carrier of `run`, when one was started.
    async fn carrier(&self, run: &str) -> Option<Arc<Carrier>> {
        self.carriers.lock().await.get(run).cloned()
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
        carrier: Option<&Carrier>,
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
        if let Some(ep) = carrier.and_then(Carrier::endpoint) {
            if let Some(addr) = super::egress::Allow::host_of_url(&ep.git_url())
                .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
            {
                egress.push(rule(addr.ip(), Some(addr.port()), "TCP"));
            }
        }
        // A remote's host, as it resolves now (`host:port` URLs; scp-like ones use ssh's 22).
        let remote_host = carrier.and_then(|c| match c {
            Carrier::Remote(r) => super::egress::Allow::host_of_url(&r.url).or_else(|| {
                let (_, rest) = r.url.split_once('@').unwrap_or(("", &r.url));
                rest.split_once(':').map(|(h, _)| format!("{h}:22"))
            }),
            Carrier::Endpoint(_) => None,
        });
        // The remote pods fetch from (whatever the network); under `api-only` also the model
        // API's and `allow_hosts`' hosts.
        let mut hosts: Vec<String> = remote_host.into_iter().collect();
        if network == NetworkMode::ApiOnly {
            hosts.extend(self.settings.allow_hosts.iter().cloned());
            hosts.extend(
                model_api
                    .filter(|a| !on_loopback(a))
                    .and_then(super::egress::Allow::host_of_url),
            );
        }
        let mut names = network == NetworkMode::ApiOnly;
        for host in hosts {
            let host = host.trim_start_matches("*.").to_string();
            let (name, port) = match host.rsplit_once(':') {
                Some((h, p)) if p.parse::<u16>().is_ok() => (h.to_string(), p.parse().ok()),
                _ => (host.clone(), None),
            };
            names |= name.parse::<std::net::IpAddr>().is_err();
            let lookup = format!("{name}:{}", port.unwrap_or(443));
            let found = tokio::net::lookup_host(lookup.clone()).await.map_err(|e| {
                format!(
                    "cannot resolve `{name}` for the `{}` NetworkPolicy: {e}",
                    network.name()
                )
            })?;
            for addr in found {
                egress.push(rule(addr.ip(), port, "TCP"));
            }
        }
        // Names must resolve.
        if names {
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

impl Runner for KubernetesRunner {
    fn kind(&self) -> &'static str {
        "kubernetes"
    }

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
        // The sender goes to the log's task: the channel closes when the log ends, which ends the
        // attempt (a sender kept here would hold it open until `DRAIN_AFTER_EXIT`).
        let (log_tx, mut log_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(256);
        let mut log_tx = Some(log_tx);
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
                            if let Some(tx) = log_tx.take() {
                                log_task = Some(self.stream_log(pod, tx));
                            }
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
            let taken = match self.carrier(&t.run).await {
                Some(carrier) => carrier
                    .take(&t.result_name)
                    .and_then(|r| r.ok_or_else(|| "the pod pushed nothing".to_string()))
                    .and_then(|result| {
                        apply_result(&t.workspace, &t.start, &result)?;
                        // The pushed commit was only a carrier: the attempt's commit is made
                        // from the worktree, as on any runner.
                        let _ = crate::workspace::git_sync(
                            &t.workspace,
                            &["update-ref", "-d", &carrier.result_ref(&t.result_name)],
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
        // The pod's own directories (an agent worker's: its session, which a later attempt may
        // resume) and the workspace's kept files (artifacts, test reports) come back too,
        // whatever the end; best effort.
        let carrier = match &travel {
            Some(t) => self.carrier(&t.run).await,
            None => None,
        };
        if let (Some(t), Some(carrier)) = (&travel, carrier) {
            let back = [
                (
                    files_name(&t.result_name),
                    PathBuf::from("/"),
                    spec.writes.clone(),
                ),
                (
                    kept_name(&t.result_name),
                    t.workspace.clone(),
                    if spec.keeps.is_empty() {
                        Vec::new()
                    } else {
                        vec![t.workspace.clone()]
                    },
                ),
            ];
            for (pushed, root, within) in back {
                if within.is_empty() {
                    continue;
                }
                let Ok(Some(commit)) = carrier.take(&pushed) else {
                    continue;
                };
                if let Err(e) = restore_files(&t.workspace, &commit, &root, &within) {
                    err_log.write(format!("ccluster: {e}\n").as_bytes());
                }
                let _ = crate::workspace::git_sync(
                    &t.workspace,
                    &["update-ref", "-d", &carrier.result_ref(&pushed)],
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
            let stream = match pods.log_stream(&pod, &params).await {
                Ok(stream) => stream,
                Err(e) => {
                    // Said in the attempt's stderr (a Role without `pods/log`, say).
                    let said = format!(
                        "{STDERR_MARK}ccluster: cannot read the log of pod {pod}: {}\n",
                        api_error(&e)
                    );
                    let _ = tx.send(said.into_bytes()).await;
                    return;
                }
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
            if job
                .metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key(LABEL_RELEASED))
            {
                // Its run ended and left it to the TTL controller.
                continue;
            }
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
        let carriers: Vec<Arc<Carrier>> =
            self.carriers.lock().await.drain().map(|(_, c)| c).collect();
        for carrier in &carriers {
            carrier.forget();
        }
        if let Some(state) = &state {
            for run in runs {
                // No pod of the run can push any more: its transport repository goes.
                let _ = std::fs::remove_dir_all(state.join("transport").join(format!("{run}.git")));
            }
            // We hold the state's lock: whatever of this state and runner is left (Jobs nothing
            // adopted, the run's Secret and NetworkPolicies, and those a killed ccluster left)
            // is no run's any more. Finished Jobs the runner keeps for a while stay.
            let keep_finished = self.settings.ttl_seconds_after_finished.is_some();
            if keep_finished {
                self.mark_released(state).await;
            }
            self.sweep(state, !keep_finished, false).await;
        }
    }

    /// Labels the state's Jobs as released: their run is over, and a later run must not adopt
    /// them (they stay for `ttl_seconds_after_finished`, for people to look at).
    async fn mark_released(&self, state: &Path) {
        let selector = ListParams::default().labels(&self.selector(state));
        let Ok(found) = self.jobs().list(&selector).await else {
            return;
        };
        let patch = serde_json::json!({"metadata": {"labels": {LABEL_RELEASED: "true"}}});
        for job in found.items {
            if let Some(name) = job.metadata.name {
                let _ = self
                    .jobs()
                    .patch(
                        &name,
                        &kube::api::PatchParams::default(),
                        &kube::api::Patch::Merge(&patch),
                    )
                    .await;
            }
        }
    }

    /// What the runner made for the state directory `state` (`kind/name`): Secrets,
    /// ConfigMaps, NetworkPolicies, and Jobs (with their pods) unless `jobs` is false; deleted
    /// unless `dry_run`.
    async fn sweep(&self, state: &Path, jobs: bool, dry_run: bool) -> Vec<String> {
        let selector = ListParams::default().labels(&self.selector(state));
        let mut found_names = Vec::new();
        if jobs {
            if let Ok(found) = self.jobs().list(&selector).await {
                for job in found.items {
                    if let Some(name) = job.metadata.name {
                        if !dry_run {
                            delete_job(&self.jobs(), &name, None).await;
                        }
                        found_names.push(format!("job/{name}"));
                    }
                }
            }
        }
        let params = DeleteParams::default();
        macro_rules! sweep_kind {
            ($kind:ty, $label:expr) => {{
                let api: Api<$kind> = Api::namespaced(self.client.clone(), &self.namespace);
                if let Ok(found) = api.list(&selector).await {
                    for item in found.items {
                        if let Some(name) = item.metadata.name {
                            if !dry_run {
                                let _ = api.delete(&name, &params).await;
                            }
                            found_names.push(format!("{}/{name}", $label));
                        }
                    }
                }
            }};
        }
        sweep_kind!(Secret, "secret");
        sweep_kind!(ConfigMap, "configmap");
        sweep_kind!(
            k8s_openapi::api::networking::v1::NetworkPolicy,
            "networkpolicy"
        );
        found_names
    }
}

impl KubernetesRunner {
    /// What the runner made for the state directory `state` that is left (a crash left it):
    /// Jobs with their pods, Secrets, ConfigMaps and NetworkPolicies, as `kind/name`; deleted
    /// unless `dry_run`. For `gc`, which holds the state's lock.
    pub async fn sweep_state(&self, state: &Path, dry_run: bool) -> Vec<String> {
        self.inner.sweep(state, true, dry_run).await
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
