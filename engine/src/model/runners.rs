//! Runners as declared in `[runners.<name>]`: each checked with its spans (a `docker` runner's
//! keys read as Docker reads them), and the checks of a task's `runner`: that it exists, and that
//! this version can run the task there.

use indexmap::IndexMap;
use serde::Serialize;

use super::raw::*;
use super::spanned::Spanned;
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
}

impl RunnerDecl {
    fn local() -> RunnerDecl {
        RunnerDecl {
            kind: RunnerKind::Local,
            image: None,
            namespace: None,
            max_parallel: None,
            docker: None,
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
        let docker = docker_settings(name, kind.value, r, diags);
        runners.insert(
            name.clone(),
            RunnerDecl {
                kind: kind.value,
                image: r.image.as_ref().map(|s| s.value.clone()),
                namespace: r.namespace.as_ref().map(|s| s.value.clone()),
                max_parallel: r.max_parallel.as_ref().map(|m| m.value as u32),
                docker,
            },
        );
    }
    runners
}

/// The `docker` keys of a runner, checked; on a runner of another kind they are ignored, with a
/// warning each.
fn docker_settings(
    name: &str,
    kind: RunnerKind,
    r: &RawRunner,
    diags: &mut Vec<Diagnostic>,
) -> Option<DockerSettings> {
    let given: Vec<(&str, Span)> = [
        ("pull", r.pull.as_ref().map(|s| s.span)),
        ("user", r.user.as_ref().map(|s| s.span)),
        ("cpus", r.cpus.as_ref().map(|s| s.span)),
        ("memory", r.memory.as_ref().map(|s| s.span)),
        ("pids", r.pids.as_ref().map(|s| s.span)),
        ("network", r.network.as_ref().map(|s| s.span)),
        ("mounts", r.mounts.as_ref().map(|s| s.span)),
        ("env", r.env.values().next().map(|s| s.span)),
        ("allow_hosts", r.allow_hosts.as_ref().map(|s| s.span)),
    ]
    .into_iter()
    .filter_map(|(key, span)| Some((key, span?)))
    .collect();
    if kind != RunnerKind::Docker {
        for (key, span) in given {
            diags.push(
                Diagnostic::warning(
                    Category::InvalidValue,
                    "ignored-key",
                    format!(
                        "runner `{name}` is `{}`: `{key}` is a `docker` runner's key and is ignored",
                        kind.name()
                    ),
                )
                .at(span, format!("ignored for `{}` runners", kind.name())),
            );
        }
        return None;
    }
    let mut invalid = |span: Span, message: String, label: &str, help: &str| {
        diags.push(
            Diagnostic::error(Category::InvalidValue, "invalid-value", message)
                .at(span, label.to_string())
                .help(help.to_string()),
        );
    };
    if let Some(u) = &r.user {
        if !is_container_user(&u.value) {
            invalid(
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
                m.span,
                format!("`mounts`: {e}"),
                "not a read-only mount",
                "write `\"<host path>:<container path>\"`; the task's worktree is mounted for you, writable",
            ),
        }
    }
    let network = r.network.as_ref().map(|n| n.value);
    let allow_hosts: Vec<String> = r
        .allow_hosts
        .iter()
        .flat_map(|l| l.value.iter())
        .filter(|h| {
            let ok = is_allowed_host(&h.value);
            if !ok {
                invalid(
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
    Some(DockerSettings {
        pull: r.pull.as_ref().map_or(PullPolicy::Missing, |p| p.value),
        user: r.user.as_ref().map(|u| u.value.clone()),
        cpus: r.cpus.as_ref().map(|c| c.value),
        memory_bytes,
        pids: r
            .pids
            .as_ref()
            .map(|p| u32::try_from(p.value).unwrap_or(u32::MAX)),
        network,
        mounts,
        env: r
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.value.clone()))
            .collect(),
        allow_hosts,
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

/// A task on a runner this version cannot run it on (anything on a `kubernetes` one) is refused
/// by `validate` and `plan`, as `apply` would refuse it before anything starts.
pub(super) fn check_runner_built(
    task: &str,
    name: &Spanned<String>,
    runners: &IndexMap<String, RunnerDecl>,
    diags: &mut Vec<Diagnostic>,
) {
    let Some(decl) = runners.get(&name.value) else {
        return;
    };
    if matches!(decl.kind, RunnerKind::Local | RunnerKind::Docker | RunnerKind::Kubernetes) {
        return;
    }
    let kind = serde_json::to_value(decl.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    diags.push(
        Diagnostic::error(
            Category::InvalidValue,
            "runner-not-built",
            format!(
                "task `{task}` runs on `{}`, a `{kind}` runner: this version runs tasks on `local` and `docker` runners only",
                name.value
            ),
        )
        .at(name.span, format!("a `{kind}` runner"))
        .help("remove `runner` (or set `runner = \"local\"`) to run the task on this machine, or name a `docker` runner"),
    );
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
}
