//! Runners as declared in `[runners.<name>]`: each checked with its spans (a `docker` runner's
//! keys read as Docker reads them, a `kubernetes` runner's as the API server would), and the check
//! of a task's `runner`: that it exists.

use indexmap::IndexMap;
use serde::Serialize;

use super::k8s_values::{
    check_dns_label, check_dns_subdomain, check_env_name, check_label_value, check_qualified_name,
    check_remote_name, check_resource_name, parse_quantity, ResourceName,
};
use super::raw::*;
use super::spanned::Spanned;
use super::workflow::parse_duration;
use crate::diagnostic::{did_you_mean, Category, Diagnostic, Span};

#[derive(Clone, Debug, Serialize)]
pub struct RunnerDecl {
    pub kind: RunnerKind,
    pub image: Option<String>,
    pub namespace: Option<String>,
    pub max_parallel: Option<u32>,
    /// A `docker` runner's settings, checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker: Option<DockerSettings>,
    /// A `kubernetes` runner's settings, checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesSettings>,
}

impl RunnerDecl {
    fn local() -> RunnerDecl {
        RunnerDecl {
            kind: RunnerKind::Local,
            image: None,
            namespace: None,
            max_parallel: None,
            docker: None,
            kubernetes: None,
        }
    }
}

/// How a `docker` runner places a task's container.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DockerSettings {
    pub pull: PullPolicy,
    /// `uid[:gid]` or a name in the image; `None`: the invoking user's uid:gid.
    pub user: Option<String>,
    pub cpus: Option<f64>,
    pub memory_bytes: Option<u64>,
    pub pids: Option<u32>,
    /// `None`: by the task's kind (`api-only` for agents, `bridge` for shell tasks).
    pub network: Option<NetworkMode>,
    /// Read-only bind mounts, host path as written (relative to the clusterfile's directory).
    pub mounts: Vec<Mount>,
    pub env: IndexMap<String, String>,
    pub allow_hosts: Vec<String>,
}

/// How a `kubernetes` runner places a task's pod: one Job per attempt, in `namespace`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KubernetesSettings {
    /// The kubeconfig context; None: the current one (or in-cluster config).
    pub context: Option<String>,
    /// None: the context's namespace (else `default`). (RunnerDecl.namespace keeps holding it too.)
    pub namespace: Option<String>,
    /// The pods' service account; None: the namespace's `default`.
    pub service_account: Option<String>,
    /// Kubernetes quantities as written (`cpu = "500m"`, `memory = "512Mi"`), checked.
    pub requests: IndexMap<String, String>,
    /// As `requests`; each at least its request.
    pub limits: IndexMap<String, String>,
    /// Node labels a pod's node must have.
    pub node_selector: IndexMap<String, String>,
    pub tolerations: Vec<Toleration>,
    /// Names of Secrets in the namespace with registry credentials.
    pub image_pull_secrets: Vec<String>,
    /// Added to the Jobs and pods; none under ccluster's own prefixes (`dev.ccluster.`,
    /// `ccluster.dev/`).
    pub labels: IndexMap<String, String>,
    /// Added to the Jobs and pods; none under ccluster's own prefixes.
    pub annotations: IndexMap<String, String>,
    pub ttl_seconds_after_finished: Option<u32>,
    /// `api-only` (default for agents), `bridge` (no NetworkPolicy; default for shell tasks), `none` (no egress).
    pub network: Option<NetworkMode>,
    /// imagePullPolicy: never → Never, missing → IfNotPresent (default), always → Always.
    pub pull: PullPolicy,
    /// A git remote of the repository (`"origin"`) pods fetch from and push to, instead of ccluster's endpoint.
    pub remote: Option<String>,
    /// Variables set in every pod (the task's own win).
    pub env: IndexMap<String, String>,
    /// Hosts (as `allow_hosts` of docker) pods may reach besides the model API and ccluster's endpoint under
    /// `api-only` (the NetworkPolicy allows them by the addresses they resolve to at run start).
    pub allow_hosts: Vec<String>,
    /// How long a pod may stay unschedulable before its attempt fails (default 5 minutes).
    #[serde(rename = "unschedulable_timeout_ms", serialize_with = "as_millis")]
    pub unschedulable_timeout: std::time::Duration,
}

/// A taint a `kubernetes` runner's pods tolerate, as the pod spec writes it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Toleration {
    pub key: Option<String>,
    /// `Equal` (default) or `Exists`.
    pub operator: Option<String>,
    pub value: Option<String>,
    /// `NoSchedule`, `PreferNoSchedule`, `NoExecute` or None (all).
    pub effect: Option<String>,
    pub toleration_seconds: Option<i64>,
}

/// How long a `kubernetes` runner's pod may wait for a node when `unschedulable_timeout` is unset.
pub const UNSCHEDULABLE_TIMEOUT_DEFAULT: std::time::Duration = std::time::Duration::from_secs(300);

/// Durations in the JSON plan are milliseconds, as a task's `timeout_ms` is.
fn as_millis<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Label and annotation keys ccluster sets itself on what it creates.
const RESERVED_KEY_PREFIXES: [&str; 2] = ["dev.ccluster.", "ccluster.dev/"];

/// The most annotations may hold together (keys and values), as Kubernetes limits them.
const MAX_ANNOTATIONS_BYTES: usize = 256 << 10;

/// A read-only bind mount of a `docker` runner.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Mount {
    pub host: String,
    pub container: String,
}

/// The smallest memory limit Docker accepts.
const MIN_CONTAINER_MEMORY: u64 = 6 << 20;

/// `512m`, `2g`, `1048576`: bytes, with an optional unit `k`, `m`, `g` or `t` (powers of 1024;
/// `kb`, `kib`, `mb`... are the same).
pub fn parse_memory(text: &str) -> Result<u64, String> {
    let t = text.trim().to_ascii_lowercase();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size"))?;
    let shift = match unit.trim_end_matches('b').trim_end_matches('i') {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(format!("`{text}` has an unknown unit")),
    };
    let bytes = number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("`{text}` is too large"))?;
    if bytes < MIN_CONTAINER_MEMORY {
        return Err(format!("`{text}` is less than the 6m Docker allows"));
    }
    Ok(bytes)
}

/// A name or number, as `docker run --user` takes it: `1000`, `1000:1000`, `builder`.
fn is_container_user(text: &str) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && !p.starts_with('-')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    };
    match text.split_once(':') {
        Some((user, group)) => part(user) && part(group),
        None => part(text),
    }
}

/// `"<host path>:<container path>"`, optionally `:ro`; the container path is absolute.
fn parse_mount(text: &str) -> Result<Mount, String> {
    let parts: Vec<&str> = text.split(':').collect();
    let (host, container) = match parts.as_slice() {
        [host, container] | [host, container, "ro"] => (*host, *container),
        [_, _, "rw"] => {
            return Err(format!(
                "`{text}` asks for a writable mount: runner mounts are read-only"
            ))
        }
        _ => return Err(format!("`{text}` is not `<host path>:<container path>`")),
    };
    if host.is_empty() || host.starts_with('-') {
        return Err(format!("`{text}` has no host path"));
    }
    if !container.starts_with('/') {
        return Err(format!("`{text}`: the container path must be absolute"));
    }
    Ok(Mount {
        host: host.to_string(),
        container: container.to_string(),
    })
}

/// `host`, `host:port` or `*.domain` (its subdomains), as the egress proxy matches them.
fn is_allowed_host(text: &str) -> bool {
    let (host, port) = match text.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (text, None),
    };
    let host = host.strip_prefix("*.").unwrap_or(host);
    let labels_ok = !host.is_empty()
        && host.split('.').all(|l| {
            !l.is_empty()
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    labels_ok && port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0))
}

pub(super) fn resolve_runners(
    raw: &RawClusterfile,
    diags: &mut Vec<Diagnostic>,
) -> IndexMap<String, RunnerDecl> {
    let mut runners = IndexMap::new();
    runners.insert("local".to_string(), RunnerDecl::local());
    for (name, r) in &raw.runners {
        if name == "local" {
            diags.push(
                Diagnostic::error(
                    Category::InvalidValue,
                    "builtin-runner",
                    "`local` is the built-in runner and cannot be redefined",
                )
                .at(r.name_span, "built in")
                .help("give this runner another name, e.g. `[runners.workstation]`"),
            );
            continue;
        }
        let Some(kind) = &r.kind else {
            if r.decode_errors {
                // `kind` was given but invalid (already reported): keep the runner so tasks that
                // name it get no false "unknown runner" error.
                runners.insert(name.clone(), RunnerDecl::local());
                continue;
            }
            diags.push(
                Diagnostic::error(
                    Category::InvalidValue,
                    "missing-key",
                    format!("runner `{name}` has no `kind`"),
                )
                .at(r.name_span, "missing `kind`")
                .help("set `kind = \"local\"`, `\"docker\"` or `\"kubernetes\"`"),
            );
            continue;
        };
        if kind.value != RunnerKind::Local && r.image.is_none() {
            diags.push(
                Diagnostic::error(
                    Category::InvalidValue,
                    "missing-key",
                    format!(
                        "runner `{name}` of kind `{}` has no `image`",
                        kind.value.name()
                    ),
                )
                .at(r.name_span, "missing `image`")
                .help("set `image = \"<container image with git and the claude CLI>\"`"),
            );
        }
        if kind.value == RunnerKind::Local && (r.image.is_some() || r.namespace.is_some()) {
            let span = r
                .image
                .as_ref()
                .or(r.namespace.as_ref())
                .map_or(r.name_span, |s| s.span);
            diags.push(
                Diagnostic::warning(
                    Category::InvalidValue,
                    "ignored-key",
                    format!("runner `{name}` is local: `image` and `namespace` are ignored"),
                )
                .at(span, "ignored for local runners"),
            );
        }
        warn_ignored_keys(name, kind.value, r, diags);
        let docker = docker_settings(name, kind.value, r, diags);
        let kubernetes = kubernetes_settings(name, kind.value, r, diags);
        runners.insert(
            name.clone(),
            RunnerDecl {
                kind: kind.value,
                image: r.image.as_ref().map(|s| s.value.clone()),
                namespace: r.namespace.as_ref().map(|s| s.value.clone()),
                max_parallel: r.max_parallel.as_ref().map(|m| m.value as u32),
                docker,
                kubernetes,
            },
        );
    }
    runners
}

/// The runner kinds a key applies to.
#[derive(Clone, Copy, PartialEq)]
enum Applies {
    Docker,
    Kubernetes,
    Containers,
}

impl Applies {
    fn to(self, kind: RunnerKind) -> bool {
        match self {
            Applies::Docker => kind == RunnerKind::Docker,
            Applies::Kubernetes => kind == RunnerKind::Kubernetes,
            Applies::Containers => kind != RunnerKind::Local,
        }
    }

    fn owner(self) -> &'static str {
        match self {
            Applies::Docker => "a `docker` runner's key",
            Applies::Kubernetes => "a `kubernetes` runner's key",
            Applies::Containers => "a key of `docker` and `kubernetes` runners",
        }
    }
}

/// Each key given on a runner of a kind it does not apply to: an `ignored-key` warning, with what
/// to write instead where there is an equivalent.
fn warn_ignored_keys(name: &str, kind: RunnerKind, r: &RawRunner, diags: &mut Vec<Diagnostic>) {
    let first = |m: &IndexMap<String, Spanned<String>>| m.values().next().map(|v| v.span);
    let keys: [(&str, Applies, Option<Span>); 21] = [
        ("pull", Applies::Containers, r.pull.as_ref().map(|s| s.span)),
        ("user", Applies::Docker, r.user.as_ref().map(|s| s.span)),
        ("cpus", Applies::Docker, r.cpus.as_ref().map(|s| s.span)),
        ("memory", Applies::Docker, r.memory.as_ref().map(|s| s.span)),
        ("pids", Applies::Docker, r.pids.as_ref().map(|s| s.span)),
        (
            "network",
            Applies::Containers,
            r.network.as_ref().map(|s| s.span),
        ),
        ("mounts", Applies::Docker, r.mounts.as_ref().map(|s| s.span)),
        ("env", Applies::Containers, first(&r.env)),
        (
            "allow_hosts",
            Applies::Containers,
            r.allow_hosts.as_ref().map(|s| s.span),
        ),
        // On a `local` runner `namespace` has its own warning, with `image`.
        (
            "namespace",
            Applies::Kubernetes,
            r.namespace
                .as_ref()
                .map(|s| s.span)
                .filter(|_| kind != RunnerKind::Local),
        ),
        (
            "context",
            Applies::Kubernetes,
            r.context.as_ref().map(|s| s.span),
        ),
        (
            "service_account",
            Applies::Kubernetes,
            r.service_account.as_ref().map(|s| s.span),
        ),
        (
            "resources",
            Applies::Kubernetes,
            r.resources.as_ref().map(|s| s.span),
        ),
        (
            "node_selector",
            Applies::Kubernetes,
            first(&r.node_selector),
        ),
        (
            "tolerations",
            Applies::Kubernetes,
            r.tolerations.as_ref().map(|s| s.span),
        ),
        (
            "image_pull_secrets",
            Applies::Kubernetes,
            r.image_pull_secrets.as_ref().map(|s| s.span),
        ),
        ("labels", Applies::Kubernetes, first(&r.labels)),
        ("annotations", Applies::Kubernetes, first(&r.annotations)),
        (
            "ttl_seconds_after_finished",
            Applies::Kubernetes,
            r.ttl_seconds_after_finished.as_ref().map(|s| s.span),
        ),
        (
            "remote",
            Applies::Kubernetes,
            r.remote.as_ref().map(|s| s.span),
        ),
        (
            "unschedulable_timeout",
            Applies::Kubernetes,
            r.unschedulable_timeout.as_ref().map(|s| s.span),
        ),
    ];
    for (key, applies, span) in keys {
        let Some(span) = span else { continue };
        if applies.to(kind) {
            continue;
        }
        let mut d = Diagnostic::warning(
            Category::InvalidValue,
            "ignored-key",
            format!(
                "runner `{name}` is `{}`: `{key}` is {} and is ignored",
                kind.name(),
                applies.owner()
            ),
        )
        .at(span, format!("ignored for `{}` runners", kind.name()));
        if kind == RunnerKind::Kubernetes {
            let instead = match key {
                "cpus" | "memory" => Some(
                    "a pod's CPUs and memory are its `resources`: `resources = { limits = { cpu = \"1500m\", memory = \"2Gi\" } }`",
                ),
                "user" => Some("a pod runs as its image's user"),
                "pids" => Some("a pod's processes are bounded by the kubelet's `podPidsLimit`"),
                "mounts" => Some("pods see no host paths: build what tasks need into the image"),
                _ => None,
            };
            if let Some(help) = instead {
                d = d.help(help);
            }
        }
        diags.push(d);
    }
}

/// An invalid value of a runner's key: an `invalid-value` error at it.
fn invalid(diags: &mut Vec<Diagnostic>, span: Span, message: String, label: &str, help: &str) {
    diags.push(
        Diagnostic::error(Category::InvalidValue, "invalid-value", message)
            .at(span, label.to_string())
            .help(help.to_string()),
    );
}

/// `allow_hosts`, checked, shared by `docker` and `kubernetes`; with a `network` other than
/// `api-only` it widens nothing, which is worth a warning.
fn allowed_hosts(name: &str, r: &RawRunner, diags: &mut Vec<Diagnostic>) -> Vec<String> {
    let hosts = r
        .allow_hosts
        .iter()
        .flat_map(|l| l.value.iter())
        .filter(|h| {
            let ok = is_allowed_host(&h.value);
            if !ok {
                invalid(
                    diags,
                    h.span,
                    format!("`allow_hosts`: `{}` is not a host name", h.value),
                    "not `host`, `host:port` or `*.domain`",
                    "e.g. `allow_hosts = [\"crates.io\", \"*.npmjs.org:443\"]`",
                );
            }
            ok
        })
        .map(|h| h.value.clone())
        .collect();
    if let (Some(list), Some(n)) = (&r.allow_hosts, &r.network) {
        if n.value != NetworkMode::ApiOnly {
            diags.push(
                Diagnostic::warning(
                    Category::InvalidValue,
                    "ignored-key",
                    format!(
                        "runner `{name}` has `network = \"{}\"`: `allow_hosts` only widens `api-only`",
                        n.value.name()
                    ),
                )
                .at(list.span, "ignored"),
            );
        }
    }
    hosts
}

fn env_values(env: &IndexMap<String, Spanned<String>>) -> IndexMap<String, String> {
    env.iter()
        .map(|(k, v)| (k.clone(), v.value.clone()))
        .collect()
}

/// The `docker` keys of a runner, checked; `None` on a runner of another kind.
fn docker_settings(
    name: &str,
    kind: RunnerKind,
    r: &RawRunner,
    diags: &mut Vec<Diagnostic>,
) -> Option<DockerSettings> {
    if kind != RunnerKind::Docker {
        return None;
    }
    if let Some(u) = &r.user {
        if !is_container_user(&u.value) {
            invalid(
                diags,
                u.span,
                format!("`user` `{}` is not a user for a container", u.value),
                "not `uid[:gid]` or a name",
                "e.g. `user = \"1000:1000\"` or a user of the image; leave it out to run as you",
            );
        }
    }
    let memory_bytes = r
        .memory
        .as_ref()
        .and_then(|m| match parse_memory(&m.value) {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                invalid(
                diags,
                m.span,
                format!("`memory`: {e}"),
                "not a memory size",
                "write bytes or a size with a unit: `512m`, `2g` (powers of 1024), at least `6m`",
            );
                None
            }
        });
    let mut mounts = Vec::new();
    for m in r.mounts.iter().flat_map(|l| l.value.iter()) {
        match parse_mount(&m.value) {
            Ok(mount) => mounts.push(mount),
            Err(e) => invalid(
                diags,
                m.span,
                format!("`mounts`: {e}"),
                "not a read-only mount",
                "write `\"<host path>:<container path>\"`; the task's worktree is mounted for you, writable",
            ),
        }
    }
    let allow_hosts = allowed_hosts(name, r, diags);
    Some(DockerSettings {
        pull: r.pull.as_ref().map_or(PullPolicy::Missing, |p| p.value),
        user: r.user.as_ref().map(|u| u.value.clone()),
        cpus: r.cpus.as_ref().map(|c| c.value),
        memory_bytes,
        pids: r
            .pids
            .as_ref()
            .map(|p| u32::try_from(p.value).unwrap_or(u32::MAX)),
        network: r.network.as_ref().map(|n| n.value),
        mounts,
        env: env_values(&r.env),
        allow_hosts,
    })
}

/// The `kubernetes` keys of a runner, checked as the API server would check the Job made from
/// them; `None` on a runner of another kind.
fn kubernetes_settings(
    name: &str,
    kind: RunnerKind,
    r: &RawRunner,
    diags: &mut Vec<Diagnostic>,
) -> Option<KubernetesSettings> {
    if kind != RunnerKind::Kubernetes {
        return None;
    }
    if let Some(c) = &r.context {
        // Any name a kubeconfig may hold, but not one that could rewrite the terminal `plan` prints to.
        let problem = if c.value.trim().is_empty() {
            Some("`context` is empty")
        } else if c.value.contains(char::is_control) {
            Some("`context` has control characters")
        } else {
            None
        };
        if let Some(problem) = problem {
            invalid(
                diags,
                c.span,
                problem.to_string(),
                "not a context's name",
                "name a context of your kubeconfig (`kubectl config get-contexts`), or leave `context` out to use the current one",
            );
        }
    }
    if let Some(ns) = &r.namespace {
        if let Err(e) = check_dns_label(&ns.value) {
            invalid(
                diags,
                ns.span,
                format!("`namespace`: {e}"),
                "not a namespace name",
                "a namespace is at most 63 lowercase letters, digits and `-`, e.g. `namespace = \"ci\"`",
            );
        }
    }
    if let Some(sa) = &r.service_account {
        if let Err(e) = check_dns_subdomain(&sa.value) {
            invalid(
                diags,
                sa.span,
                format!("`service_account`: {e}"),
                "not a service account name",
                "a service account's name is lowercase letters, digits, `-` and `.`, e.g. `service_account = \"ccluster-tasks\"`",
            );
        }
    }
    for secret in r.image_pull_secrets.iter().flat_map(|l| l.value.iter()) {
        if let Err(e) = check_dns_subdomain(&secret.value) {
            invalid(
                diags,
                secret.span,
                format!("`image_pull_secrets`: {e}"),
                "not a Secret's name",
                "name Secrets of the runner's namespace, e.g. `image_pull_secrets = [\"regcred\"]`",
            );
        }
    }
    let resources = r.resources.as_ref().map(|s| &s.value);
    let (requests, limits) = match resources {
        Some(res) => check_resources(res, diags),
        None => Default::default(),
    };
    let node_selector = labels_checked("node_selector", &r.node_selector, false, diags);
    let labels = labels_checked("labels", &r.labels, true, diags);
    let annotations = annotations_checked(&r.annotations, diags);
    let tolerations = r
        .tolerations
        .iter()
        .flat_map(|l| l.value.iter())
        .filter_map(|t| toleration_checked(t, diags))
        .collect();
    for (key, value) in &r.env {
        if let Err(e) = check_env_name(key) {
            invalid(
                diags,
                value.span,
                format!("`env`: {e}"),
                "not a variable name Kubernetes accepts",
                "rename the variable, e.g. `BUILD_MODE`",
            );
        }
    }
    if let Some(remote) = &r.remote {
        if let Err(e) = check_remote_name(&remote.value) {
            invalid(
                diags,
                remote.span,
                format!("`remote`: {e}"),
                "not a git remote's name",
                "name a remote of the repository (`git remote -v`), e.g. `remote = \"origin\"`",
            );
        }
    }
    let unschedulable_timeout = match &r.unschedulable_timeout {
        Some(t) => parse_duration(t, "unschedulable_timeout", diags)
            .unwrap_or(UNSCHEDULABLE_TIMEOUT_DEFAULT),
        None => UNSCHEDULABLE_TIMEOUT_DEFAULT,
    };
    let allow_hosts = allowed_hosts(name, r, diags);
    Some(KubernetesSettings {
        context: r.context.as_ref().map(|c| c.value.clone()),
        namespace: r.namespace.as_ref().map(|n| n.value.clone()),
        service_account: r.service_account.as_ref().map(|s| s.value.clone()),
        requests,
        limits,
        node_selector,
        tolerations,
        image_pull_secrets: r
            .image_pull_secrets
            .iter()
            .flat_map(|l| l.value.iter().map(|s| s.value.clone()))
            .collect(),
        labels,
        annotations,
        ttl_seconds_after_finished: r
            .ttl_seconds_after_finished
            .as_ref()
            .and_then(|t| u32::try_from(t.value).ok()),
        network: r.network.as_ref().map(|n| n.value),
        pull: r.pull.as_ref().map_or(PullPolicy::Missing, |p| p.value),
        remote: r.remote.as_ref().map(|s| s.value.clone()),
        env: env_values(&r.env),
        allow_hosts,
        unschedulable_timeout,
    })
}

/// `resources.requests` and `resources.limits`: known resource names, valid quantities, and no
/// request above its limit (nor, for resources Kubernetes does not overcommit, a request without
/// an equal limit).
fn check_resources(
    res: &RawResources,
    diags: &mut Vec<Diagnostic>,
) -> (IndexMap<String, String>, IndexMap<String, String>) {
    type Read<'a> = IndexMap<String, (u128, ResourceName, &'a Spanned<String>)>;
    fn read<'a>(
        table: &str,
        map: &'a IndexMap<String, Spanned<String>>,
        diags: &mut Vec<Diagnostic>,
    ) -> Read<'a> {
        const KNOWN: [&str; 3] = ["cpu", "memory", "ephemeral-storage"];
        let mut values = IndexMap::new();
        for (resource, q) in map {
            let kind = match check_resource_name(resource) {
                Ok(kind) => kind,
                Err(e) => {
                    let help = match did_you_mean(resource, KNOWN) {
                        Some(best) => format!("did you mean `{best}`?"),
                        None if resource.starts_with("mem") => "did you mean `memory`?".to_string(),
                        None => "resources are `cpu`, `memory`, `ephemeral-storage`, `hugepages-<size>`, or an extended resource `<domain>/<name>` (`nvidia.com/gpu`)".to_string(),
                    };
                    diags.push(
                        Diagnostic::error(
                            Category::InvalidValue,
                            "invalid-value",
                            format!("`resources.{table}`: {e}"),
                        )
                        .at(q.span, "unknown resource")
                        .help(help),
                    );
                    continue;
                }
            };
            match parse_quantity(&q.value) {
                Ok(amount) if kind == ResourceName::NotOvercommitted && amount % 1000 != 0 => {
                    invalid(
                        diags,
                        q.span,
                        format!(
                            "`resources.{table}.{resource}`: `{}` is not a whole number",
                            q.value
                        ),
                        "not a whole number",
                        "hugepages and extended resources are counted in whole units",
                    )
                }
                Ok(amount) => {
                    values.insert(resource.clone(), (amount, kind, q));
                }
                Err(e) => {
                    let help = if resource == "cpu" {
                        "write CPUs as `1`, `0.5` or millicores `500m`"
                    } else {
                        "write a quantity: bytes `1000000`, or with a suffix `512Mi`, `1Gi` (powers of 1024) or `1G` (powers of 1000)"
                    };
                    invalid(
                        diags,
                        q.span,
                        format!("`resources.{table}.{resource}`: {e}"),
                        "not a Kubernetes quantity",
                        help,
                    )
                }
            }
        }
        values
    }
    let requests = read("requests", &res.requests, diags);
    let limits = read("limits", &res.limits, diags);
    for (resource, (request, kind, rq)) in &requests {
        let limit = limits.get(resource);
        let problem = match (limit, kind) {
            (Some((limit, _, lq)), _) if request > limit => Some((
                format!(
                    "the request for `{resource}` ({}) is above its limit ({})",
                    rq.value, lq.value
                ),
                "above the limit",
                Some(lq.span),
                "raise the limit or lower the request: a container cannot be given more than its limit",
            )),
            (Some((limit, _, lq)), ResourceName::NotOvercommitted) if request != limit => Some((
                format!(
                    "the request for `{resource}` ({}) differs from its limit ({})",
                    rq.value, lq.value
                ),
                "not equal to the limit",
                Some(lq.span),
                "Kubernetes does not overcommit this resource: make the request equal to the limit, or leave the request out",
            )),
            (None, ResourceName::NotOvercommitted) => Some((
                format!("`{resource}` is requested without a limit"),
                "no limit",
                None,
                "Kubernetes does not overcommit this resource: set the same amount under `limits` (a limit alone is enough)",
            )),
            _ => None,
        };
        if let Some((message, label, limit_span, help)) = problem {
            let mut d = Diagnostic::error(Category::InvalidValue, "invalid-value", message)
                .at(rq.span, label)
                .help(help);
            if let Some(span) = limit_span {
                d = d.note(span, "the limit");
            }
            diags.push(d);
        }
    }
    let text = |m: Read<'_>| {
        m.into_iter()
            .map(|(k, (_, _, q))| (k, q.value.clone()))
            .collect()
    };
    (text(requests), text(limits))
}

/// Whether a label or annotation key is under one of ccluster's own prefixes.
fn is_reserved_key(key: &str) -> bool {
    RESERVED_KEY_PREFIXES.iter().any(|p| key.starts_with(p))
}

/// `labels` or `node_selector`: keys and values as Kubernetes validates labels; `labels` may not
/// use ccluster's prefixes (a node's labels may: they are not ccluster's to set).
fn labels_checked(
    table: &str,
    map: &IndexMap<String, Spanned<String>>,
    reserve: bool,
    diags: &mut Vec<Diagnostic>,
) -> IndexMap<String, String> {
    let mut out = IndexMap::new();
    for (key, value) in map {
        let mut ok = true;
        if let Err(e) = check_qualified_name(key) {
            ok = false;
            invalid(
                diags,
                value.span,
                format!("`{table}`: {e}"),
                "its key is not a label key",
                "a label key is an optional DNS prefix and `/`, then at most 63 letters, digits, `-`, `_` and `.` (`app.kubernetes.io/name`, `team`)",
            );
        } else if reserve && is_reserved_key(key) {
            ok = false;
            diags.push(
                Diagnostic::error(
                    Category::InvalidValue,
                    "invalid-value",
                    format!("`{table}`: `{key}` is one of ccluster's own labels"),
                )
                .at(value.span, "a reserved key")
                .help("ccluster sets the keys under `dev.ccluster.` and `ccluster.dev/` itself (run, task, attempt): choose another prefix"),
            );
        }
        if let Err(e) = check_label_value(&value.value) {
            ok = false;
            invalid(
                diags,
                value.span,
                format!("`{table}.{key}`: {e}"),
                "not a label value",
                "a label value is empty or at most 63 letters, digits, `-`, `_` and `.`, starting and ending with a letter or digit",
            );
        }
        if ok {
            out.insert(key.clone(), value.value.clone());
        }
    }
    out
}

/// `annotations`: keys as label keys (not ccluster's own), values free, 256 KiB in all.
fn annotations_checked(
    map: &IndexMap<String, Spanned<String>>,
    diags: &mut Vec<Diagnostic>,
) -> IndexMap<String, String> {
    let mut out = IndexMap::new();
    for (key, value) in map {
        if let Err(e) = check_qualified_name(key) {
            invalid(
                diags,
                value.span,
                format!("`annotations`: {e}"),
                "its key is not an annotation key",
                "an annotation key is an optional DNS prefix and `/`, then at most 63 letters, digits, `-`, `_` and `.` (`example.com/owner`)",
            );
        } else if is_reserved_key(key) {
            diags.push(
                Diagnostic::error(
                    Category::InvalidValue,
                    "invalid-value",
                    format!("`annotations`: `{key}` is one of ccluster's own keys"),
                )
                .at(value.span, "a reserved key")
                .help("ccluster sets the keys under `dev.ccluster.` and `ccluster.dev/` itself: choose another prefix"),
            );
        } else {
            out.insert(key.clone(), value.value.clone());
        }
    }
    let total: usize = map.iter().map(|(k, v)| k.len() + v.value.len()).sum();
    if let (true, Some(first)) = (total > MAX_ANNOTATIONS_BYTES, map.values().next()) {
        invalid(
            diags,
            first.span,
            format!("`annotations` hold {total} bytes: Kubernetes takes at most 256 KiB"),
            "too large in all",
            "keep large data out of annotations (in the image, or a ConfigMap)",
        );
    }
    out
}

/// One toleration, checked as the pod spec's validation does.
fn toleration_checked(t: &RawToleration, diags: &mut Vec<Diagnostic>) -> Option<Toleration> {
    let before = diags.len();
    let operator = t.operator.as_ref().map(|o| o.value);
    let exists = operator == Some(TolerationOperator::Exists);
    if let Some(key) = &t.key {
        if let Err(e) = check_qualified_name(&key.value) {
            invalid(
                diags,
                key.span,
                format!("a toleration's `key`: {e}"),
                "not a taint key",
                "a taint key is written as a label key (`nvidia.com/gpu`, `dedicated`)",
            );
        }
    } else if !exists {
        invalid(
            diags,
            t.span,
            "a toleration without `key` must have `operator = \"Exists\"`".to_string(),
            "no `key`",
            "name the taint's `key`, or write `operator = \"Exists\"` to tolerate every taint",
        );
    }
    match (&t.value, exists) {
        (Some(v), true) => invalid(
            diags,
            v.span,
            "a toleration with `operator = \"Exists\"` takes no `value`".to_string(),
            "a value with `Exists`",
            "remove `value`, or use `operator = \"Equal\"` to match this value only",
        ),
        (Some(v), false) => {
            if let Err(e) = check_label_value(&v.value) {
                invalid(
                    diags,
                    v.span,
                    format!("a toleration's `value`: {e}"),
                    "not a taint value",
                    "a taint value is written as a label value",
                );
            }
        }
        (None, _) => {}
    }
    if let Some(seconds) = &t.toleration_seconds {
        if t.effect.as_ref().map(|e| e.value) != Some(TaintEffect::NoExecute) {
            invalid(
                diags,
                seconds.span,
                "`toleration_seconds` needs `effect = \"NoExecute\"`".to_string(),
                "without `NoExecute`",
                "only a `NoExecute` taint evicts pods: set `effect = \"NoExecute\"` or remove `toleration_seconds`",
            );
        }
    }
    (diags.len() == before).then(|| Toleration {
        key: t.key.as_ref().map(|k| k.value.clone()),
        operator: operator.map(|o| o.name().to_string()),
        value: t.value.as_ref().map(|v| v.value.clone()),
        effect: t.effect.as_ref().map(|e| e.value.name().to_string()),
        toleration_seconds: t.toleration_seconds.as_ref().map(|s| s.value),
    })
}

pub(super) fn check_runner_name(
    name: &Spanned<String>,
    runners: &IndexMap<String, RunnerDecl>,
    diags: &mut Vec<Diagnostic>,
) {
    if runners.contains_key(&name.value) {
        return;
    }
    let mut d = Diagnostic::error(
        Category::InvalidValue,
        "unknown-runner",
        format!("unknown runner `{}`", name.value),
    )
    .at(name.span, "no such runner");
    d = match did_you_mean(&name.value, runners.keys().map(String::as_str)) {
        Some(best) => d.help(format!("did you mean `{best}`?")),
        None => d.help(format!(
            "declare it under `[runners.{}]` with a `kind`",
            name.value
        )),
    };
    diags.push(d);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_runner_values_are_read_as_docker_reads_them() {
        assert_eq!(parse_memory("512m"), Ok(512 << 20));
        assert_eq!(parse_memory("2G"), Ok(2 << 30));
        assert_eq!(parse_memory("1gib"), Ok(1 << 30));
        assert_eq!(parse_memory("7340032"), Ok(7 << 20));
        assert!(parse_memory("5m").is_err(), "below Docker's minimum");
        assert!(parse_memory("lots").is_err());
        assert!(parse_memory("1x").is_err());
        assert!(parse_memory("99999999999999999999t").is_err());
        assert!(parse_memory("9999999999t").is_err(), "overflows");
        for ok in ["1000", "1000:1000", "builder", "www-data:adm"] {
            assert!(is_container_user(ok), "{ok}");
        }
        for bad in ["", "-u", "a b", "1000:", ":1000", "a:b:c"] {
            assert!(!is_container_user(bad), "{bad}");
        }
        assert_eq!(
            parse_mount("/srv/cache:/cache:ro"),
            Ok(Mount {
                host: "/srv/cache".into(),
                container: "/cache".into()
            })
        );
        assert!(
            parse_mount("cache:/cache").is_ok(),
            "relative to the clusterfile"
        );
        for bad in ["/a:/b:rw", "/a:b", "/a", "-v:/b", ":/b", "/a:/b:ro:x"] {
            assert!(parse_mount(bad).is_err(), "{bad}");
        }
        for ok in [
            "crates.io",
            "registry.npmjs.org:443",
            "*.github.com",
            "localhost",
        ] {
            assert!(is_allowed_host(ok), "{ok}");
        }
        for bad in [
            "bad host",
            "x.org:0",
            "x.org:99999",
            "-x.org",
            "a..b",
            "*.",
            "http://x.org",
        ] {
            assert!(!is_allowed_host(bad), "{bad}");
        }
    }

    fn resources(requests: &[(&str, &str)], limits: &[(&str, &str)]) -> Vec<String> {
        let map = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), Spanned::new(v.to_string(), Span::default())))
                .collect()
        };
        let raw = RawResources {
            requests: map(requests),
            limits: map(limits),
        };
        let mut diags = Vec::new();
        check_resources(&raw, &mut diags);
        diags.into_iter().map(|d| d.message).collect()
    }

    #[test]
    fn requests_are_compared_with_limits_exactly() {
        // The same amount written differently is not "above".
        assert!(resources(&[("cpu", "0.1")], &[("cpu", "100m")]).is_empty());
        assert!(resources(&[("memory", "1Gi")], &[("memory", "1024Mi")]).is_empty());
        assert!(resources(&[("memory", "1G")], &[("memory", "1Gi")]).is_empty());
        assert!(resources(&[("cpu", "2")], &[]).is_empty(), "no limit");
        assert!(resources(&[], &[("nvidia.com/gpu", "1")]).is_empty());
        assert!(resources(&[("nvidia.com/gpu", "2")], &[("nvidia.com/gpu", "2e0")]).is_empty());
        let above = resources(&[("cpu", "1001m")], &[("cpu", "1")]);
        assert_eq!(
            above,
            ["the request for `cpu` (1001m) is above its limit (1)"]
        );
        let above = resources(&[("memory", "1Gi")], &[("memory", "1G")]);
        assert_eq!(above.len(), 1, "{above:?}");
        let unequal = resources(&[("nvidia.com/gpu", "1")], &[("nvidia.com/gpu", "2")]);
        assert_eq!(unequal.len(), 1, "{unequal:?}");
        let alone = resources(&[("hugepages-2Mi", "1Gi")], &[]);
        assert_eq!(alone, ["`hugepages-2Mi` is requested without a limit"]);
        // An invalid quantity is reported once, not again as "above its limit".
        let bad = resources(&[("cpu", "lots")], &[("cpu", "1")]);
        assert_eq!(bad.len(), 1, "{bad:?}");
    }
}
