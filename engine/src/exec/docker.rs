//! The Docker runner: each attempt's process in a container of its own, through the Docker Engine
//! API (`DOCKER_HOST`, else the usual socket). The task's directory is bind-mounted at the same
//! path, so paths in commands, logs and outputs mean the same inside and out; output streams to
//! the attempt's log files as on the local runner, and timeouts and cancellation stop the
//! container (SIGTERM, the grace period, then SIGKILL).
//!
//!
//! An agent's worker gets the pinned `claude` CLI mounted read-only, its own directory writable,
//! and its credentials through stdin (never in the container's configuration); by default it sits
//! on the `api-only` network, whose only way out is the run's egress proxy ([`super::egress`]).
//! Containers a killed ccluster left are found again by their labels ([`Runner::recover`]):
//! finished ones are harvested and running ones adopted by the next run's attempt of the same
//! work, instead of running it again.

use std::collections::HashMap;
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::models::{ContainerCreateBody, HostConfig, NetworkCreateRequest};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, CreateImageOptionsBuilder,
    InspectContainerOptions, InspectNetworkOptions, KillContainerOptionsBuilder,
    ListContainersOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    StopContainerOptionsBuilder,
};
use bollard::Docker;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio::time::Instant;

use super::egress::{self, Allow, EgressProxy};
use super::lines::LineSplitter;
use super::runner::{LazyLog, ProcessEnd, ProcessFuture, ProcessResult, ProcessSpec, Runner, Stop};
use crate::model::raw::{NetworkMode, PullPolicy};
use crate::model::workflow::DockerSettings;

/// The labels every container of ccluster carries: how a later `apply` or `gc` finds them.
pub const LABEL_RUN: &str = "dev.ccluster.run";
pub const LABEL_TASK: &str = "dev.ccluster.task";
pub const LABEL_ATTEMPT: &str = "dev.ccluster.attempt";
/// The state directory whose run made the container: its orphans are found by it.
pub const LABEL_STATE: &str = "dev.ccluster.state";
/// The declared runner that made it (two runners of one state share a daemon).
pub const LABEL_RUNNER: &str = "dev.ccluster.runner";
/// The attempt's cache key: a later attempt with the same key may adopt the container.
pub const LABEL_KEY: &str = "dev.ccluster.key";
/// The attempt's worktree, when it has one: where an adopting attempt's workspace comes from.
pub const LABEL_WORKSPACE: &str = "dev.ccluster.workspace";

/// The network of `api-only` containers: internal (no route out), its containers unable to
/// reach each other; shared by every run on the daemon, each run with its own proxy on it.
pub const API_ONLY_NETWORK: &str = "ccluster-api-only";

/// Runs task processes in containers of one image.
pub struct DockerRunner {
    docker: Docker,
    image: String,
    settings: DockerSettings,
    /// Where relative host paths of `mounts` start: the clusterfile's directory.
    base_dir: std::path::PathBuf,
    /// The `api-only` network and this run's proxy on its gateway, when a task may need them.
    api_only: Option<ApiOnly>,
    /// The runner's name in the clusterfile (its containers' [`LABEL_RUNNER`]).
    name: String,
    /// Containers a killed ccluster left that an attempt of this run may adopt.
    kept: std::sync::Mutex<Vec<Kept>>,
}

/// A container found by [`Runner::recover`], waiting to be adopted.
struct Kept {
    id: String,
    node: String,
    key: String,
    workspace: Option<std::path::PathBuf>,
}

struct ApiOnly {
    proxy: EgressProxy,
}

impl DockerRunner {
    /// Connects to the daemon (`DOCKER_HOST`, else `/var/run/docker.sock`) and checks that it
    /// answers and that the image is there: a daemon that is not running or an image it does not
    /// have is said before anything starts.
    ///
    /// `agents`: whether agent processes may run on it, which sit on the `api-only` network
    /// unless the runner says otherwise; that network and the proxy are set up here too.
    pub async fn connect(
        name: &str,
        image: &str,
        settings: DockerSettings,
        base_dir: &std::path::Path,
        agents: bool,
    ) -> Result<DockerRunner, String> {
        let docker = Docker::connect_with_local_defaults()
            .map_err(|e| format!("cannot reach the Docker daemon: {e}"))?;
        docker.ping().await.map_err(|e| {
            format!(
                "cannot reach the Docker daemon at {}: {e}",
                std::env::var("DOCKER_HOST").unwrap_or_else(|_| "/var/run/docker.sock".into())
            )
        })?;
        let present = docker.inspect_image(image).await.is_ok();
        match settings.pull {
            PullPolicy::Never if !present => {
                return Err(format!(
                    "image `{image}` is not on this machine, and the runner's `pull` is `never`"
                ))
            }
            PullPolicy::Missing if !present => pull(&docker, image).await?,
            PullPolicy::Always => pull(&docker, image).await?,
            _ => {}
        }
        let api_only = match settings.network {
            Some(NetworkMode::ApiOnly) => Some(api_only(&docker).await?),
            None if agents => Some(api_only(&docker).await?),
            _ => None,
        };
        Ok(DockerRunner {
            docker,
            image: image.to_string(),
            settings,
            base_dir: base_dir.to_path_buf(),
            api_only,
            name: name.to_string(),
            kept: Default::default(),
        })
    }

    /// The network a process sits on: the runner's `network`, else `api-only` for an agent
    /// and Docker's `bridge` for anything else.
    fn network_of(&self, spec: &ProcessSpec) -> NetworkMode {
        self.settings
            .network
            .unwrap_or(if spec.model_api.is_some() {
                NetworkMode::ApiOnly
            } else {
                NetworkMode::Bridge
            })
    }
}

/// Finds (or makes) the `api-only` network, and starts this run's egress proxy on its gateway:
/// the one address its containers can reach. The daemon must share this machine's network
/// (a daemon elsewhere has its gateway elsewhere), which is said here, before anything starts.
async fn api_only(docker: &Docker) -> Result<ApiOnly, String> {
    let network = match docker
        .inspect_network(API_ONLY_NETWORK, None::<InspectNetworkOptions>)
        .await
    {
        Ok(n) => n,
        Err(_) => {
            let request = NetworkCreateRequest {
                name: API_ONLY_NETWORK.into(),
                driver: Some("bridge".into()),
                internal: Some(true),
                options: Some(HashMap::from([(
                    "com.docker.network.bridge.enable_icc".to_string(),
                    "false".to_string(),
                )])),
                labels: Some(HashMap::from([(
                    "dev.ccluster.network".to_string(),
                    "api-only".to_string(),
                )])),
                ..Default::default()
            };
            // Another run may have made it meanwhile: then it is there to inspect.
            let made = docker.create_network(request).await;
            docker
                .inspect_network(API_ONLY_NETWORK, None::<InspectNetworkOptions>)
                .await
                .map_err(|e| match made {
                    Err(made) => format!("cannot make the `api-only` network: {made}"),
                    Ok(_) => format!("cannot inspect the `api-only` network: {e}"),
                })?
        }
    };
    if network.internal != Some(true) {
        return Err(format!(
            "the Docker network `{API_ONLY_NETWORK}` exists and is not internal: remove it \
             (`docker network rm {API_ONLY_NETWORK}`) and ccluster makes it again"
        ));
    }
    let gateway = network
        .ipam
        .and_then(|i| i.config)
        .unwrap_or_default()
        .into_iter()
        .find_map(|c| gateway_of(c.gateway.as_deref(), c.subnet.as_deref()?))
        .ok_or_else(|| format!("the Docker network `{API_ONLY_NETWORK}` has no IPv4 gateway"))?;
    let proxy = egress::start(std::net::SocketAddr::new(gateway, 0))
        .await
        .map_err(|e| {
            format!(
                "cannot listen on {gateway}, the gateway of the `api-only` network ({e}): its \
                 egress proxy must run where the Docker daemon's networks are (a daemon on \
                 another machine or in another network namespace cannot have `api-only`)"
            )
        })?;
    Ok(ApiOnly { proxy })
}

/// A network's gateway: the one Docker names, else the first address of its IPv4 subnet.
fn gateway_of(gateway: Option<&str>, subnet: &str) -> Option<std::net::IpAddr> {
    if let Some(ip) = gateway.and_then(|g| g.parse::<std::net::Ipv4Addr>().ok()) {
        return Some(ip.into());
    }
    let (base, _) = subnet.split_once('/')?;
    let base: std::net::Ipv4Addr = base.parse().ok()?;
    Some(std::net::Ipv4Addr::from(u32::from(base) + 1).into())
}

/// Pulls `image` (`name[:tag]`, the tag `latest` when none is given), waiting for the end.
async fn pull(docker: &Docker, image: &str) -> Result<(), String> {
    // A colon after the last slash separates the tag (a colon before it is a registry's port).
    let (name, tag) = match image.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name, tag),
        _ => (image, "latest"),
    };
    let options = CreateImageOptionsBuilder::default()
        .from_image(name)
        .tag(tag)
        .build();
    let mut progress = docker.create_image(Some(options), None, None);
    while let Some(step) = progress.next().await {
        step.map_err(|e| format!("cannot pull image `{image}`: {e}"))?;
    }
    Ok(())
}

/// The attempt a process belongs to, for the container's name and labels: its identity, or (for
/// a process made by hand) its `CCLUSTER_*` variables.
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

/// The container's name: the same for the same attempt, so a leftover one is found (and
/// replaced) by name; only characters Docker allows in names.
pub fn container_name(run: &str, node: &str, attempt: &str) -> String {
    format!("ccluster-{run}-{node}-{attempt}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The invoking user, as `docker run --user` takes it: files written in the mounted directory
/// stay theirs.
fn invoking_user() -> String {
    format!("{}:{}", nix::unistd::getuid(), nix::unistd::getgid())
}

/// Variables ccluster passes from its own environment that describe this machine, not the
/// container: dropped (the image's own apply) unless the task set them to something else.
const HOST_ONLY_ENV: &[&str] = &["PATH", "HOME", "USER", "LOGNAME", "TMPDIR"];

/// Reads credentials from stdin before the process starts, so that they are in the process's
/// environment and nowhere else: not in the container's configuration (`docker inspect`), not in
/// a file. `$1` is the line that ends them; the rest of stdin is the process's.
const CREDENTIALS_PRELUDE: &str = r#"end=$1; shift; s=; while IFS= read -r l; do [ "$l" = "$end" ] && break; s="$s$l
"; done; eval "$s"; unset s l end; exec "$@""#;

/// `value` quoted for `sh`: inside single quotes, each `'` written as `'\''`.
fn sh_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// A worktree's git directories, so that `git status` and `git diff` work inside: the worktree's
/// own (its index and HEAD) writable, the repository's read-only. Objects and refs cannot be
/// written from inside; ccluster commits the task's changes itself when the attempt ends.
fn git_binds(workspace: &std::path::Path) -> Vec<String> {
    let Ok(pointer) = std::fs::read_to_string(workspace.join(".git")) else {
        return Vec::new();
    };
    let Some(own) = pointer.trim().strip_prefix("gitdir: ") else {
        return Vec::new();
    };
    let own = workspace.join(own);
    let Some(common) = std::fs::read_to_string(own.join("commondir"))
        .ok()
        .map(|c| own.join(c.trim()))
        .and_then(|c| c.canonicalize().ok())
    else {
        return Vec::new();
    };
    // Docker mounts the deeper path over the shallower one, whatever their order here.
    vec![
        format!("{0}:{0}:ro", common.display()),
        format!("{0}:{0}:rw", own.display()),
    ]
}

/// What a container is made of: its configuration, and what goes to its stdin first.
struct Made {
    body: ContainerCreateBody,
    stdin: Option<Vec<u8>>,
}

impl DockerRunner {
    fn container_body(
        &self,
        spec: &ProcessSpec,
        network: NetworkMode,
        labels: HashMap<String, String>,
    ) -> Made {
        let mut cmd = match &spec.argv {
            Some(argv) => argv.clone(),
            None => vec!["/bin/sh".into(), "-c".into(), spec.command.clone()],
        };
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
            // An agent's tools want a writable home: its worker directory.
            if let Some(dir) = spec.writes.first() {
                pairs.push(("HOME".into(), dir.display().to_string()));
            }
        }
        if let (NetworkMode::ApiOnly, Some(api)) = (network, &self.api_only) {
            let proxy = format!("http://{}", api.proxy.addr);
            pairs.retain(|(k, _)| {
                !matches!(
                    k.to_ascii_uppercase().as_str(),
                    "HTTP_PROXY" | "HTTPS_PROXY" | "ALL_PROXY" | "NO_PROXY"
                )
            });
            for name in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
                pairs.push((name.into(), proxy.clone()));
            }
        }
        // Credentials go through stdin, ahead of what the process reads there.
        let (secret, env): (Vec<_>, Vec<_>) = pairs
            .into_iter()
            .partition(|(k, _)| spec.secret_env.contains(k));
        let mut stdin = spec.stdin.clone();
        if !secret.is_empty() {
            let end = format!("#end-{}", crate::agent::new_session_id());
            let mut prelude: Vec<u8> = Vec::new();
            for (k, v) in &secret {
                prelude.extend_from_slice(format!("export {k}={}\n", sh_quote(v)).as_bytes());
            }
            prelude.extend_from_slice(format!("{end}\n").as_bytes());
            prelude.extend(stdin.take().unwrap_or_default());
            stdin = Some(prelude);
            let mut wrapped = vec![
                "/bin/sh".to_string(),
                "-c".into(),
                CREDENTIALS_PRELUDE.into(),
                "ccluster-credentials".into(),
                end,
            ];
            wrapped.append(&mut cmd);
            cmd = wrapped;
        }
        let env: Vec<String> = env.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
        let cwd = spec.cwd.display().to_string();
        // The workspace at its own path, writable, and the working directory if it lies outside;
        // the process's own directories writable, what it reads read-only.
        let mut binds = Vec::new();
        let mut shown: Vec<&std::path::Path> = Vec::new();
        if let Some(ws) = &spec.workspace {
            binds.push(format!("{0}:{0}:rw", ws.display()));
            shown.push(ws);
        }
        if !shown.iter().any(|p| spec.cwd.starts_with(p)) {
            binds.push(format!("{cwd}:{cwd}:rw"));
            shown.push(&spec.cwd);
        }
        for dir in &spec.writes {
            if !shown.iter().any(|p| dir.starts_with(p)) {
                binds.push(format!("{0}:{0}:rw", dir.display()));
                shown.push(dir);
            }
        }
        for path in &spec.reads {
            if !shown.iter().any(|p| path.starts_with(p)) {
                binds.push(format!("{0}:{0}:ro", path.display()));
                shown.push(path);
            }
        }
        if let Some(ws) = &spec.workspace {
            binds.extend(git_binds(ws));
        }
        for m in &self.settings.mounts {
            let host = self.base_dir.join(&m.host);
            binds.push(format!("{}:{}:ro", host.display(), m.container));
        }
        let network = match network {
            NetworkMode::None => "none",
            NetworkMode::ApiOnly => API_ONLY_NETWORK,
            NetworkMode::Bridge => "bridge",
        };
        let body = ContainerCreateBody {
            image: Some(self.image.clone()),
            cmd: Some(cmd),
            env: Some(env),
            working_dir: Some(cwd),
            user: Some(self.settings.user.clone().unwrap_or_else(invoking_user)),
            labels: Some(labels),
            attach_stdin: Some(stdin.is_some()),
            open_stdin: Some(stdin.is_some()),
            stdin_once: Some(stdin.is_some()),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(false),
            host_config: Some(HostConfig {
                binds: Some(binds),
                network_mode: Some(network.into()),
                memory: self.settings.memory_bytes.map(|m| m as i64),
                // Swap would let a container use more than its limit says.
                memory_swap: self.settings.memory_bytes.map(|m| m as i64),
                nano_cpus: self.settings.cpus.map(|c| (c * 1e9) as i64),
                pids_limit: self.settings.pids.map(i64::from),
                // An init reaps what the task leaves behind and passes signals on.
                init: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        };
        Made { body, stdin }
    }

    async fn remove(docker: &Docker, name: &str) {
        let _ = docker
            .remove_container(
                name,
                Some(RemoveContainerOptionsBuilder::default().force(true).build()),
            )
            .await;
    }
}

impl Runner for DockerRunner {
    fn kind(&self) -> &'static str {
        "docker"
    }

    fn run(&self, spec: ProcessSpec, stop: watch::Receiver<Stop>) -> ProcessFuture {
        let network = self.network_of(&spec);
        if let Some(refusal) = unreachable_model_api(&spec, network) {
            return Box::pin(std::future::ready(ProcessResult {
                end: ProcessEnd::Unstartable(refusal),
                stdout: Vec::new(),
            }));
        }
        let (run, node, attempt) = attempt_of(&spec);
        let name = container_name(&run, &node, &attempt);
        let mut labels: HashMap<String, String> = [
            (LABEL_RUN.to_string(), run),
            (LABEL_TASK.to_string(), node),
            (LABEL_ATTEMPT.to_string(), attempt),
            (LABEL_RUNNER.to_string(), self.name.clone()),
        ]
        .into();
        if let Some(id) = &spec.identity {
            labels.insert(LABEL_STATE.into(), id.state_dir.display().to_string());
            if let Some(key) = &id.cache_key {
                labels.insert(LABEL_KEY.into(), key.clone());
            }
            // Only a worktree of the state moves to an adopting attempt.
            if let Some(ws) = spec
                .workspace
                .as_ref()
                .filter(|ws| ws.starts_with(id.state_dir.join("worktrees")))
            {
                labels.insert(LABEL_WORKSPACE.into(), ws.display().to_string());
            }
        }
        if let Some(adopted) = spec.adopt.clone() {
            return Box::pin(adopt_container(self.docker.clone(), adopted, spec, stop));
        }
        let made = self.container_body(&spec, network, labels);
        // Under `api-only`, the container may reach the model API's host and `allow_hosts`.
        let egress = match (network, &self.api_only) {
            (NetworkMode::ApiOnly, Some(api)) => {
                let mut hosts: Vec<String> = self.settings.allow_hosts.clone();
                hosts.extend(spec.model_api.as_deref().and_then(Allow::host_of_url));
                Some((
                    api.proxy.clients.clone(),
                    Allow::new(hosts.iter().map(String::as_str)),
                ))
            }
            _ => None,
        };
        Box::pin(run_container(
            self.docker.clone(),
            name,
            made,
            egress,
            spec,
            stop,
        ))
    }

    /// Finds this runner's containers of the state directory (their ccluster died: we hold the
    /// state's lock). A container that finished, or runs on a network that does not depend on
    /// the dead ccluster, is kept for an attempt with its node and cache key to adopt: its work
    /// is not done twice. One on the `api-only` network is stopped and removed (its egress proxy,
    /// and a rehearsal's model server, died with ccluster), as is one without a cache key or
    /// never started: their tasks run again.
    fn recover(
        &self,
        state_dir: &std::path::Path,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<std::path::PathBuf>> + Send + '_>>
    {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![
                format!("{LABEL_STATE}={}", state_dir.display()),
                format!("{LABEL_RUNNER}={}", self.name),
            ],
        )]);
        Box::pin(async move {
            let options = ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&filters)
                .build();
            let Ok(found) = self.docker.list_containers(Some(options)).await else {
                return Vec::new();
            };
            let mut kept: Vec<(u32, Kept)> = Vec::new();
            for c in found {
                // By name: what people see in `docker ps`, and what events show.
                let Some(id) = c
                    .names
                    .as_ref()
                    .and_then(|n| n.first())
                    .map(|n| n.trim_start_matches('/').to_string())
                    .or(c.id)
                else {
                    continue;
                };
                let labels = c.labels.unwrap_or_default();
                let label = |k: &str| labels.get(k).cloned();
                use bollard::models::ContainerSummaryStateEnum as State;
                let adoptable = match c.state {
                    Some(State::EXITED) => true,
                    Some(State::RUNNING) => c
                        .host_config
                        .and_then(|h| h.network_mode)
                        .is_some_and(|n| n != API_ONLY_NETWORK),
                    _ => false,
                };
                match (adoptable, label(LABEL_TASK), label(LABEL_KEY)) {
                    (true, Some(node), Some(key)) => {
                        let attempt = label(LABEL_ATTEMPT)
                            .and_then(|a| a.parse().ok())
                            .unwrap_or(0);
                        let workspace = label(LABEL_WORKSPACE).map(std::path::PathBuf::from);
                        kept.push((
                            attempt,
                            Kept {
                                id,
                                node,
                                key,
                                workspace,
                            },
                        ));
                    }
                    _ => DockerRunner::remove(&self.docker, &id).await,
                }
            }
            // One per node and key: the latest attempt's.
            kept.sort_by_key(|k| std::cmp::Reverse(k.0));
            let mut unique: Vec<Kept> = Vec::new();
            for (_, k) in kept {
                if unique.iter().any(|u| u.node == k.node && u.key == k.key) {
                    DockerRunner::remove(&self.docker, &k.id).await;
                } else {
                    unique.push(k);
                }
            }
            let workspaces = unique.iter().filter_map(|k| k.workspace.clone()).collect();
            *self.kept.lock().unwrap_or_else(|e| e.into_inner()) = unique;
            workspaces
        })
    }

    fn adopt(&self, node: &str, key: &str) -> Option<super::runner::Adopted> {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        // A workspace that is gone (moved by an adoption that was itself killed) took the
        // container's work with it: that container is not adopted, only removed at the end.
        let i = kept.iter().position(|k| {
            k.node == node && k.key == key && k.workspace.as_ref().is_none_or(|w| w.is_dir())
        })?;
        let k = kept.remove(i);
        Some(super::runner::Adopted {
            handle: k.id,
            workspace: k.workspace,
        })
    }

    fn release(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let left: Vec<Kept> =
                std::mem::take(&mut *self.kept.lock().unwrap_or_else(|e| e.into_inner()));
            for k in left {
                DockerRunner::remove(&self.docker, &k.id).await;
            }
        })
    }
}

/// Removes the container if the supervising future is dropped before it ended: no task outlives
/// its supervisor, in a container or not.
struct ContainerGuard {
    docker: Docker,
    name: String,
    armed: bool,
}

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (docker, name) = (self.docker.clone(), self.name.clone());
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move { DockerRunner::remove(&docker, &name).await });
        }
    }
}

/// Why an agent on `network` could not reach its model API, if it could not: a model API on this
/// machine's loopback (the scripted server of a rehearsal, a local gateway) is reached through the
/// `api-only` proxy only.
fn unreachable_model_api(spec: &ProcessSpec, network: NetworkMode) -> Option<String> {
    let api = spec.model_api.as_deref()?;
    let host = Allow::host_of_url(api)?;
    let host = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match network {
        NetworkMode::None => Some(format!(
            "the agent's container has no network (`network = \"none\"`), so it cannot reach \
             its model API at {api}: use `network = \"api-only\"`"
        )),
        NetworkMode::Bridge if loopback => Some(format!(
            "the model API at {api} is on this machine's loopback, which a container on \
             `network = \"bridge\"` cannot reach: use `network = \"api-only\"` (its proxy \
             reaches it)"
        )),
        _ => None,
    }
}

async fn run_container(
    docker: Docker,
    name: String,
    made: Made,
    egress: Option<(egress::Clients, Allow)>,
    spec: ProcessSpec,
    stop: watch::Receiver<Stop>,
) -> ProcessResult {
    let failed = |e: String| ProcessResult {
        end: ProcessEnd::SpawnFailed(e),
        stdout: Vec::new(),
    };
    use tracing::Instrument as _;
    let Made { body, stdin } = made;
    // A container of the same attempt left by an earlier process is not this one's to reuse.
    let created = async {
        DockerRunner::remove(&docker, &name).await;
        docker
            .create_container(
                Some(CreateContainerOptionsBuilder::default().name(&name).build()),
                body,
            )
            .await
    }
    .instrument(tracing::info_span!("docker.create", container = %name))
    .await;
    if let Err(e) = created {
        return failed(format!("cannot create container `{name}`: {e}"));
    }
    let guard = ContainerGuard {
        docker: docker.clone(),
        name: name.clone(),
        armed: true,
    };
    // Attached before it starts, so that no output is missed; only the stream, not a replay of
    // the logs, which would repeat what the stream delivers when the container starts meanwhile.
    let attached = docker
        .attach_container(
            &name,
            Some(
                AttachContainerOptionsBuilder::default()
                    .stdin(stdin.is_some())
                    .stdout(true)
                    .stderr(true)
                    .stream(true)
                    .logs(false)
                    .build(),
            ),
        )
        .instrument(tracing::info_span!("docker.attach"))
        .await;
    let attached = match attached {
        Ok(a) => a,
        Err(e) => return failed(format!("cannot attach to container `{name}`: {e}")),
    };
    if let Err(e) = docker
        .start_container(&name, None)
        .instrument(tracing::info_span!("docker.start"))
        .await
    {
        return failed(format!("cannot start container `{name}`: {e}"));
    }
    // Admitted to the proxy under its address, once it has one; refusals come back here.
    let (refused_tx, refused) = tokio::sync::mpsc::unbounded_channel();
    let _admission = match egress {
        Some((clients, allow)) => {
            let ip = docker
                .inspect_container(&name, None::<InspectContainerOptions>)
                .await
                .ok()
                .and_then(|c| c.network_settings?.networks?.remove(API_ONLY_NETWORK))
                .and_then(|e| e.ip_address?.parse::<std::net::IpAddr>().ok());
            ip.map(|ip| {
                clients.admit(
                    ip,
                    egress::Client {
                        allow,
                        refused: refused_tx,
                    },
                )
            })
        }
        None => None,
    };
    if let Some(bytes) = stdin {
        let mut input = attached.input;
        tokio::spawn(async move {
            let _ = input.write_all(&bytes).await;
            let _ = input.shutdown().await;
        });
    }
    supervise(docker, name, guard, attached.output, refused, spec, stop)
        .instrument(tracing::info_span!("docker.wait"))
        .await
}

/// What a container prints, as Docker streams it.
type Output = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>,
>;

/// Takes over a container a killed ccluster left (see [`Runner::recover`]): everything it printed
/// from its start (replayed from Docker's log, then followed while it runs), then its end.
async fn adopt_container(
    docker: Docker,
    name: String,
    spec: ProcessSpec,
    stop: watch::Receiver<Stop>,
) -> ProcessResult {
    let guard = ContainerGuard {
        docker: docker.clone(),
        name: name.clone(),
        armed: true,
    };
    if let Some(id) = &spec.identity {
        let running = docker
            .inspect_container(&name, None::<InspectContainerOptions>)
            .await
            .ok()
            .and_then(|c| c.state?.running)
            .unwrap_or(false);
        let what = if running { "running" } else { "finished" };
        id.notice(
            "adopted",
            format!("the {what} container {name}, left by a killed ccluster: its work is not done again"),
        );
    }
    let output: Output = Box::pin(
        docker.logs(
            &name,
            Some(
                LogsOptionsBuilder::default()
                    .follow(true)
                    .stdout(true)
                    .stderr(true)
                    .build(),
            ),
        ),
    );
    let (_none, refused) = tokio::sync::mpsc::unbounded_channel();
    supervise(docker, name, guard, output, refused, spec, stop).await
}

/// Streams the container's output to the attempt's logs until it ends (or its time is up, or the
/// run is cancelled: then it is stopped), and takes its end; the container is removed.
async fn supervise(
    docker: Docker,
    name: String,
    mut guard: ContainerGuard,
    mut output: Output,
    mut refused: tokio::sync::mpsc::UnboundedReceiver<String>,
    spec: ProcessSpec,
    mut stop: watch::Receiver<Stop>,
) -> ProcessResult {
    let mut out_log = LazyLog::new(spec.stdout.clone());
    let mut err_log = LazyLog::new(spec.stderr.clone());
    let mut lines = LineSplitter::default();
    let mut kept: Vec<u8> = Vec::new();
    let timeout_at = spec.timeout.map(|t| Instant::now() + t);
    let mut decided: Option<ProcessEnd> = None;
    let mut output_open = true;
    let mut wait = Box::pin(docker.wait_container(&name, None));
    let mut exit_code: Option<i64> = None;
    // Once the run's stop channel is gone, nothing more can come from it.
    let mut stop_open = true;
    loop {
        if exit_code.is_some() && !output_open {
            break;
        }
        tokio::select! {
            item = output.next(), if output_open => match item {
                Some(Ok(LogOutput::StdOut { message })) | Some(Ok(LogOutput::Console { message })) => {
                    out_log.write(&message);
                    if let Some(tx) = &spec.lines {
                        lines.push(&message, |line| {
                            let _ = tx.send(line);
                        });
                    }
                    kept.extend_from_slice(&message);
                    if kept.len() > 2 * super::runner::STDOUT_KEPT {
                        kept.drain(..kept.len() - super::runner::STDOUT_KEPT);
                    }
                }
                Some(Ok(LogOutput::StdErr { message })) => err_log.write(&message),
                Some(Ok(LogOutput::StdIn { .. })) => {}
                Some(Err(_)) | None => output_open = false,
            },
            Some(target) = refused.recv() => {
                let line = format!(
                    "ccluster: refused a connection to {target} (network \"api-only\": not the model API, not in allow_hosts)\n"
                );
                err_log.write(line.as_bytes());
                if let Some(id) = &spec.identity {
                    id.notice("egress_refused", target);
                }
            }
            status = wait.next(), if exit_code.is_none() => {
                exit_code = Some(match status {
                    Some(Ok(r)) => r.status_code,
                    // A non-zero exit is an "error" of the wait API.
                    Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => code,
                    _ => -1,
                });
            }
            _ = async { match timeout_at { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } }, if exit_code.is_none() && decided.is_none() => {
                decided = Some(ProcessEnd::TimedOut);
                stop_container(&docker, &name, spec.grace, Stop::Graceful).await;
            }
            changed = stop.changed(), if stop_open && exit_code.is_none() && decided.is_none() => {
                if changed.is_err() {
                    stop_open = false;
                    continue;
                }
                let level = *stop.borrow();
                if level == Stop::No {
                    continue;
                }
                decided = Some(ProcessEnd::Cancelled);
                stop_container(&docker, &name, spec.grace, level).await;
            }
        }
    }
    if let Some(tx) = &spec.lines {
        lines.finish(|line| {
            let _ = tx.send(line);
        });
    }
    let oom_killed = docker
        .inspect_container(&name, None::<InspectContainerOptions>)
        .await
        .ok()
        .and_then(|c| c.state.and_then(|s| s.oom_killed))
        .unwrap_or(false);
    guard.armed = false;
    DockerRunner::remove(&docker, &name).await;
    if kept.len() > super::runner::STDOUT_KEPT {
        kept.drain(..kept.len() - super::runner::STDOUT_KEPT);
    }
    let end = match (decided, exit_code) {
        (Some(end), _) => end,
        _ if oom_killed => ProcessEnd::OutOfMemory,
        (None, Some(code)) => ProcessEnd::Exited(code as i32),
        (None, None) => ProcessEnd::Exited(-1),
    };
    ProcessResult { end, stdout: kept }
}

/// Stops a container as the local runner stops a process group: SIGTERM, then SIGKILL after the
/// grace period (at once for `Stop::Now`).
async fn stop_container(docker: &Docker, name: &str, grace: Duration, level: Stop) {
    if level == Stop::Now {
        let _ = docker
            .kill_container(
                name,
                Some(
                    KillContainerOptionsBuilder::default()
                        .signal("KILL")
                        .build(),
                ),
            )
            .await;
        return;
    }
    let seconds = i32::try_from(grace.as_secs().max(1)).unwrap_or(i32::MAX);
    let _ = docker
        .stop_container(
            name,
            Some(
                StopContainerOptionsBuilder::default()
                    .signal("TERM")
                    .t(seconds)
                    .build(),
            ),
        )
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The prelude as the container runs it, with this machine's `/bin/sh`: credentials read from
    /// stdin (quotes, newlines and `$` kept as they are), the rest of stdin left to the program.
    #[test]
    fn the_credentials_prelude_exports_them_and_leaves_the_rest_of_stdin() {
        let tricky = "it's a \"key\"\nwith $HOME and `ticks` \\ and\n#end-not-this";
        let end = "#end-0123";
        let mut stdin = format!(
            "export KEY={}\nexport OTHER={}\n{end}\n",
            sh_quote(tricky),
            sh_quote("plain")
        );
        stdin.push_str("the prompt\nsecond line\n");
        let mut child = std::process::Command::new("/bin/sh")
            .args([
                "-c",
                CREDENTIALS_PRELUDE,
                "ccluster-credentials",
                end,
                "/bin/sh",
                "-c",
                r#"printf '%s|%s|' "$KEY" "$OTHER"; cat"#,
            ])
            .env_clear()
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{tricky}|plain|the prompt\nsecond line\n")
        );
    }

    #[test]
    fn a_networks_gateway_is_the_named_one_or_its_subnets_first_address() {
        assert_eq!(
            gateway_of(Some("198.51.100.65"), "198.51.100.64/26"),
            Some("198.51.100.65".parse().unwrap())
        );
        assert_eq!(
            gateway_of(None, "198.51.100.64/26"),
            Some("198.51.100.65".parse().unwrap())
        );
        assert_eq!(gateway_of(None, "fd00::/64"), None);
    }
}
