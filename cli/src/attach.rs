//! `ccluster attach [RUN] TASK [-- COMMAND...]`: a shell (or one command) where a running task
//! works: its worktree on the local runner, or, for a task without a workspace, the clusterfile's
//! directory. The task keeps running; leaving the shell detaches.

use std::path::{Path, PathBuf};
use std::process::Command;

use ccluster_engine::store::{RunState, TaskRecord, TaskState};
use ccluster_engine::workspace::names::node_file_name;

use crate::exit;
use crate::runs::{find_run, load_runs};

pub struct AttachArgs<'a> {
    pub run: Option<&'a str>,
    pub task: Option<&'a str>,
    pub command: &'a [String],
}

pub fn attach(dir: &Path, args: AttachArgs<'_>) -> u8 {
    // A lone positional that cannot be a run id is the task, of the latest run.
    let (run, task) = match (args.run, args.task) {
        (Some(first), None)
            if !first.starts_with(|c: char| c.is_ascii_digit()) && first != "latest" =>
        {
            (None, Some(first))
        }
        given => given,
    };
    let Some(task) = task else {
        eprintln!("error: which task? `ccluster attach [RUN] TASK`");
        eprintln!("  help: `ccluster status` lists the run's tasks and which are running");
        return exit::INVALID_INPUT;
    };
    let view = match load_runs(dir).and_then(|v| find_run(v, run)) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let running: Vec<&TaskRecord> = view
        .tasks
        .iter()
        .filter(|t| t.node == task || t.task == task)
        .filter(|t| t.state == TaskState::Running)
        .collect();
    let in_progress = view.live && view.run.state == RunState::Running;
    let record = match running.as_slice() {
        [one] if in_progress => *one,
        [] | [_] => {
            eprintln!(
                "error: `{task}` is not running in run {}{}",
                view.run.id,
                if in_progress {
                    ""
                } else {
                    " (the run is not in progress)"
                }
            );
            eprintln!(
                "  help: attach works while a task runs; `ccluster logs {} {task}` and `ccluster artifacts {} {task}` show what it did",
                view.run.id, view.run.id
            );
            return exit::INVALID_INPUT;
        }
        many => {
            eprintln!("error: {} plan nodes of `{task}` are running:", many.len());
            for t in many {
                eprintln!("  {}", t.node);
            }
            eprintln!(
                "  help: name one plan node, e.g. `ccluster attach {}`",
                many[0].node
            );
            return exit::INVALID_INPUT;
        }
    };
    let place = where_it_works(
        dir,
        &view.run.id,
        &view.run.clusterfile,
        view.run.repo.as_deref(),
        record,
    );
    let attempt = record.attempts.max(1).to_string();
    // On a docker runner, the attempt's container (named for it): the shell goes inside.
    let container =
        ccluster_engine::exec::docker::container_name(&view.run.id, &record.node, &attempt);
    if container_exists(&container) {
        return attach_container(&container, &place, &record.node, &attempt, args.command);
    }
    eprintln!(
        "attached to {} (attempt {attempt}) in {}; the task keeps running when you leave",
        record.node,
        place.display()
    );
    let mut cmd = match args.command.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest);
            c
        }
        None => Command::new(std::env::var_os("SHELL").unwrap_or_else(|| "/bin/sh".into())),
    };
    let status = cmd
        .current_dir(&place)
        .env("CCLUSTER_RUN", &view.run.id)
        .env("CCLUSTER_TASK", &record.node)
        .env("CCLUSTER_ATTEMPT", &attempt)
        .status();
    match status {
        Ok(s) => s
            .code()
            .map_or(exit::TASK_FAILED, |c| c.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!(
                "error: cannot start `{}`: {e}",
                cmd.get_program().to_string_lossy()
            );
            exit::INVALID_INPUT
        }
    }
}

/// Whether the Docker daemon (`DOCKER_HOST`, else the usual socket) has a running container of
/// that name; `false` when there is no daemon or no `docker` command.
fn container_exists(name: &str) -> bool {
    Command::new("docker")
        .args([
            "container",
            "inspect",
            "--format",
            "{{.State.Running}}",
            name,
        ])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "true")
}

/// `docker exec` into the attempt's container, in the task's directory (the same path as on the
/// host): a shell, interactive when this is a terminal, or the given command.
fn attach_container(name: &str, place: &Path, node: &str, attempt: &str, command: &[String]) -> u8 {
    use std::io::IsTerminal;
    eprintln!(
        "attached to {node} (attempt {attempt}) in container {name}, {}; the task keeps running when you leave",
        place.display()
    );
    let mut cmd = Command::new("docker");
    cmd.arg("exec");
    if std::io::stdin().is_terminal() {
        cmd.arg("-it");
    }
    cmd.arg("-w").arg(place).arg(name);
    if command.is_empty() {
        cmd.arg("/bin/sh");
    } else {
        cmd.args(command);
    }
    match cmd.status() {
        Ok(s) => s
            .code()
            .map_or(exit::TASK_FAILED, |c| c.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("error: cannot run `docker exec`: {e}");
            exit::INVALID_INPUT
        }
    }
}

/// The directory the task's command runs in: the clusterfile's directory inside the attempt's
/// worktree, or the clusterfile's directory itself for a task without one.
fn where_it_works(
    dir: &Path,
    run: &str,
    clusterfile: &str,
    repo: Option<&str>,
    record: &TaskRecord,
) -> PathBuf {
    let clusterfile_dir = Path::new(clusterfile)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let worktree = dir.join("worktrees").join(run).join(format!(
        "{}.{}",
        node_file_name(&record.node),
        record.attempts.max(1)
    ));
    if !worktree.is_dir() {
        return std::fs::canonicalize(clusterfile_dir).unwrap_or_else(|_| clusterfile_dir.into());
    }
    // The clusterfile's place in the repository, when it can be told from here.
    let inside = repo.and_then(|repo| {
        let at = std::fs::canonicalize(clusterfile_dir).ok()?;
        at.strip_prefix(repo).ok().map(Path::to_path_buf)
    });
    match inside {
        Some(rel) if worktree.join(&rel).is_dir() => worktree.join(rel),
        _ => worktree,
    }
}
