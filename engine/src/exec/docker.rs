//! The Docker runner: each attempt's process in a container of its own, through the Docker Engine
//! API (`DOCKER_HOST`, else the usual socket). The task's directory is bind-mounted at the same
//! path, so paths in commands, logs and outputs mean the same inside and out; output streams to
//! the attempt's log files as on the local runner, and timeouts and cancellation stop the
//! container (SIGTERM, the grace period, then SIGKILL).
//!
//! Not built yet, and refused where they are asked for: agent tasks in containers, the `api-only`
//! network, finding containers again after ccluster was killed.

use std::collections::HashMap;
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, CreateImageOptionsBuilder,
    InspectContainerOptions, KillContainerOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use bollard::Docker;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio::time::Instant;

use super::lines::LineSplitter;
use super::runner::{LazyLog, ProcessEnd, ProcessFuture, ProcessResult, ProcessSpec, Runner, Stop};
use crate::model::raw::{NetworkMode, PullPolicy};
use crate::model::workflow::DockerSettings;

/// The labels every container of ccluster carries: how a later `apply` or `gc` finds them.
pub const LABEL_RUN: &str = "dev.ccluster.run";
pub const LABEL_TASK: &str = "dev.ccluster.task";
pub const LABEL_ATTEMPT: &str = "dev.ccluster.attempt";

/// Runs task processes in containers of one image.
pub struct DockerRunner {
    docker: Docker,
    image: String,
    settings: DockerSettings,
    /// Where relative host paths of `mounts` start: the clusterfile's directory.
    base_dir: std::path::PathBuf,
}

impl DockerRunner {
    /// Connects to the daemon (`DOCKER_HOST`, else `/var/run/docker.sock`) and checks that it
    /// answers and that the image is there: a daemon that is not running or an image it does not
    /// have is said before anything starts.
    pub async fn connect(
        image: &str,
        settings: DockerSettings,
        base_dir: &std::path::Path,
    ) -> Result<DockerRunner, String> {
        if settings.network == Some(NetworkMode::ApiOnly) {
            return Err("`network = \"api-only\"` is not built yet: use `none` or `bridge`".into());
        }
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
        Ok(DockerRunner {
            docker,
            image: image.to_string(),
            settings,
            base_dir: base_dir.to_path_buf(),
        })
    }
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

/// The container's name: the same for the same attempt, so a leftover one is found (and
/// replaced) by name; only characters Docker allows in names.
pub fn container_name(env: &[(String, String)]) -> String {
    let var = |name: &str| {
        env.iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    };
    let raw = format!(
        "ccluster-{}-{}-{}",
        var("CCLUSTER_RUN"),
        var("CCLUSTER_TASK"),
        var("CCLUSTER_ATTEMPT")
    );
    raw.chars()
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

impl DockerRunner {
    fn container_body(&self, spec: &ProcessSpec) -> ContainerCreateBody {
        let cmd = match &spec.argv {
            Some(argv) => argv.clone(),
            None => vec!["/bin/sh".into(), "-c".into(), spec.command.clone()],
        };
        // The runner's `env` first, then the task's own: what the task declares wins.
        let mut env: Vec<String> = self
            .settings
            .env
            .iter()
            .filter(|(k, _)| !spec.env.iter().any(|(name, _)| name == *k))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        env.extend(spec.env.iter().map(|(k, v)| format!("{k}={v}")));
        let cwd = spec.cwd.display().to_string();
        // The workspace at its own path, writable, and the working directory if it lies outside.
        let mut binds = Vec::new();
        if let Some(ws) = &spec.workspace {
            let ws = ws.display().to_string();
            binds.push(format!("{ws}:{ws}:rw"));
        }
        if !spec
            .workspace
            .as_ref()
            .is_some_and(|ws| spec.cwd.starts_with(ws))
        {
            binds.push(format!("{cwd}:{cwd}:rw"));
        }
        for m in &self.settings.mounts {
            let host = self.base_dir.join(&m.host);
            binds.push(format!("{}:{}:ro", host.display(), m.container));
        }
        let var = |name: &str| {
            spec.env
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        let labels: HashMap<String, String> = [
            (LABEL_RUN.to_string(), var("CCLUSTER_RUN")),
            (LABEL_TASK.to_string(), var("CCLUSTER_TASK")),
            (LABEL_ATTEMPT.to_string(), var("CCLUSTER_ATTEMPT")),
        ]
        .into();
        let network = match self.settings.network {
            Some(NetworkMode::None) => "none",
            _ => "bridge",
        };
        ContainerCreateBody {
            image: Some(self.image.clone()),
            cmd: Some(cmd),
            env: Some(env),
            working_dir: Some(cwd),
            user: Some(self.settings.user.clone().unwrap_or_else(invoking_user)),
            labels: Some(labels),
            attach_stdin: Some(spec.stdin.is_some()),
            open_stdin: Some(spec.stdin.is_some()),
            stdin_once: Some(spec.stdin.is_some()),
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
        }
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
    fn run(&self, spec: ProcessSpec, stop: watch::Receiver<Stop>) -> ProcessFuture {
        let docker = self.docker.clone();
        let body = self.container_body(&spec);
        Box::pin(run_container(docker, body, spec, stop))
    }

    /// Removes, running or not, every container labelled with the interrupted run: its tasks are
    /// run again, as those of the local runner are; a container that finished after ccluster
    /// died has no recorded result to keep (what it printed until then is in the logs).
    fn sweep(
        &self,
        run: &str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        let filter = format!("{LABEL_RUN}={run}");
        Box::pin(async move {
            let options = ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&HashMap::from([("label".to_string(), vec![filter])]))
                .build();
            let Ok(found) = self.docker.list_containers(Some(options)).await else {
                return;
            };
            for c in found {
                if let Some(id) = c.id {
                    DockerRunner::remove(&self.docker, &id).await;
                }
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

async fn run_container(
    docker: Docker,
    body: ContainerCreateBody,
    spec: ProcessSpec,
    mut stop: watch::Receiver<Stop>,
) -> ProcessResult {
    let failed = |e: String| ProcessResult {
        end: ProcessEnd::SpawnFailed(e),
        stdout: Vec::new(),
    };
    let name = container_name(&spec.env);
    // A container of the same attempt left by an earlier process is not this one's to reuse.
    DockerRunner::remove(&docker, &name).await;
    if let Err(e) = docker
        .create_container(
            Some(CreateContainerOptionsBuilder::default().name(&name).build()),
            body,
        )
        .await
    {
        return failed(format!("cannot create container `{name}`: {e}"));
    }
    let mut guard = ContainerGuard {
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
                    .stdin(spec.stdin.is_some())
                    .stdout(true)
                    .stderr(true)
                    .stream(true)
                    .logs(false)
                    .build(),
            ),
        )
        .await;
    let mut attached = match attached {
        Ok(a) => a,
        Err(e) => return failed(format!("cannot attach to container `{name}`: {e}")),
    };
    if let Err(e) = docker.start_container(&name, None).await {
        return failed(format!("cannot start container `{name}`: {e}"));
    }
    if let Some(bytes) = spec.stdin.clone() {
        let mut input = attached.input;
        tokio::spawn(async move {
            let _ = input.write_all(&bytes).await;
            let _ = input.shutdown().await;
        });
    }
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
            item = attached.output.next(), if output_open => match item {
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
