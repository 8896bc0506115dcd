//! An attempt's pod: its script (the task behind a `sh` that marks stderr, forwards SIGTERM, and
//! fetches and pushes the workspace), environment (credentials by `secretKeyRef`), inputs
//! (a ConfigMap) and volumes, as the Job the runner makes.

use super::*;
use tracing::Instrument as _;

/// Variables ccluster passes from its own environment that describe this machine, not the pod:
/// dropped (the image's own apply) unless the task set them to something else.
pub(super) const HOST_ONLY_ENV: &[&str] = &["PATH", "HOME", "USER", "LOGNAME", "TMPDIR"];

/// `value` quoted for `sh`.
pub(super) fn sh_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// The `sh` lines that move a pod's work: its workspace fetched before the task, its result
/// pushed after it (on success), and its own directories' files pushed after it (whatever the end).
#[derive(Default)]
pub(super) struct Transfers<'a> {
    pub(super) fetch: Option<&'a str>,
    pub(super) push: Option<&'a str>,
    pub(super) push_files: Option<&'a str>,
}

/// What an attempt's pod does, as `sh` runs it: fetch the workspace (when it travels), run the
/// task with its stderr lines marked (the pod's log merges both streams), push what it made, and
/// exit with the task's status. `"$@"` is the task's program and arguments.
pub(super) fn pod_script(
    pod_dir: &str,
    transfers: &Transfers,
    cwd: &str,
    stdin: bool,
    files: &[(String, String)],
    dirs: &[String],
) -> String {
    // The task runs in a process group of its own (`setsid`, where the image has it): SIGTERM
    // reaches all of it, and what it leaves running when it ends goes with it, as on the local
    // runner.
    // Everything the script says on stderr (its own messages, git's, the task's) is marked.
    let mut s = format!(
        "set -u\n\
         e={pod_dir}/scratch/stderr; mkfifo \"$e\" || exit {TRANSPORT_FAILED}\n\
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
            "mkdir -p {} && cp {pod_dir}/in/{key} {} || finish {TRANSPORT_FAILED}\n",
            sh_quote(&dir),
            sh_quote(path)
        ));
    }
    if let Some(fetch) = transfers.fetch {
        s.push_str(&format!(
            "( {fetch} ) || {{ echo 'ccluster: cannot fetch the workspace' >&2; finish {TRANSPORT_FAILED}; }}\n"
        ));
    }
    s.push_str(&format!(
        "mkdir -p {0} && cd {0} || finish {TRANSPORT_FAILED}\n",
        sh_quote(cwd)
    ));
    let input = if stdin {
        format!("{pod_dir}/in/stdin")
    } else {
        "/dev/null".into()
    };
    s.push_str(&format!(
        "if command -v setsid >/dev/null 2>&1; then setsid \"$@\" < {input} & else \"$@\" < {input} & fi; pid=$!\n\
         trap 'kill -TERM -$pid 2>/dev/null || kill -TERM $pid 2>/dev/null' TERM INT\n\
         wait $pid; status=$?\n\
         while kill -0 $pid 2>/dev/null; do wait $pid; status=$?; done\n\
         kill -KILL -$pid 2>/dev/null\n"
    ));
    if let Some(push_files) = transfers.push_files {
        s.push_str(push_files);
    }
    if let Some(push) = transfers.push {
        s.push_str(&format!(
            "if [ \"$status\" = 0 ]; then ( {push} ) || {{ echo 'ccluster: cannot push the workspace' >&2; finish {TRANSPORT_FAILED}; }}; fi\n"
        ));
    }
    // The marker's reader ends when nothing holds the pipe open any more: it is waited for, lest
    // the container stop before the last lines are out.
    s.push_str("finish \"$status\"\n");
    s
}

/// The attempt a process belongs to: its identity, or (for a process made by hand) its
/// `CCLUSTER_*` variables.
pub(super) fn attempt_of(spec: &ProcessSpec) -> (String, String, String) {
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
pub(super) fn on_loopback(url: &str) -> bool {
    let Some(host) = crate::exec::egress::Allow::host_of_url(url) else {
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

/// Files sent to a pod (path and contents), and the directories to make for it.
pub(super) type Inputs = (Vec<(PathBuf, Vec<u8>)>, Vec<PathBuf>);

/// Files an isolated process reads or writes, sent to its pod: the contents of its own
/// directories (an agent worker's settings and config) and the small files it reads, by path.
/// The `claude` CLI itself is the image's. Credentials files are not sent.
pub(super) fn files_of(spec: &ProcessSpec, program: Option<&str>) -> Result<Inputs, String> {
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
pub(super) const MAX_INPUTS: usize = 1 << 20;

/// How an attempt's pod is set up, before its Job is made.
pub(super) struct Prepared {
    pub(super) job: Job,
    pub(super) inputs: Option<ConfigMap>,
    pub(super) travel: Option<Travel>,
}

impl Inner {
    pub(super) fn state_of(&self, spec: &ProcessSpec) -> PathBuf {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(id) = &spec.identity {
            state.get_or_insert_with(|| id.state_dir.clone());
        }
        state.clone().unwrap_or_else(|| PathBuf::from(".ccluster"))
    }

    pub(super) async fn run(
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
            // The kept worktree was moved to this attempt's workspace. The Job's run (the killed
            // one) has its endpoint started again, on its port and with its token, which its pod
            // pushes to.
            let travel = self.travel_of_kept(&name, &run).await.map(|t| Travel {
                workspace: spec.workspace.clone().unwrap_or(t.workspace),
                ..t
            });
            if let Some(t) = &travel {
                let _ = self.endpoint(&t.run, &state, &t.workspace).await;
            }
            return Ok(self.supervise(&hub, name, travel, spec, stop).await);
        }
        let name = job_name(&run, &node, &attempt);
        let prepared = match self
            .prepare(&spec, &state, &run, &node, &attempt, &name)
            .instrument(tracing::info_span!("kubernetes.prepare", job = %name))
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
                .instrument(tracing::info_span!("kubernetes.create_inputs"))
                .await
                .map_err(|e| format!("cannot make ConfigMap `{cm_name}`: {}", api_error(&e)))?;
        }
        let created = jobs
            .create(&PostParams::default(), &prepared.job)
            .instrument(tracing::info_span!("kubernetes.create_job"))
            .await;
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
            .instrument(tracing::info_span!("kubernetes.watch"))
            .await)
    }

    /// For an adopted Job: where its workspace came from and goes (its annotations).
    pub(super) async fn travel_of_kept(&self, name: &str, run: &str) -> Option<Travel> {
        let job = self.jobs().get(name).await.ok()?;
        let notes = job.metadata.annotations?;
        Some(Travel {
            run: notes
                .get(NOTE_RUN)
                .cloned()
                .unwrap_or_else(|| run.to_string()),
            workspace: PathBuf::from(notes.get(NOTE_WORKSPACE)?),
            start: notes.get(NOTE_START)?.clone(),
            result_name: name.to_string(),
        })
    }

    pub(super) async fn prepare(
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
        let mut push_files = None;
        if let (Some(ws), Some(ep)) = (worktree, &endpoint) {
            let scratch = state.join("tmp").join(format!("{name}.index"));
            let _ = std::fs::create_dir_all(state.join("tmp"));
            let start = snapshot(ws, &scratch).map_err(Unstartable)?;
            let start_ref = ep.offer(name, &start).map_err(Unstartable)?;
            let dir = ws.display().to_string();
            let token_var = if ep.token().is_some() { TOKEN_VAR } else { "" };
            fetch = Some(crate::exec::endpoint::fetch_script(
                &ep.git_url(),
                token_var,
                &start_ref,
                &dir,
            ));
            push = Some(crate::exec::endpoint::push_script(
                &ep.git_url(),
                token_var,
                run,
                name,
                &dir,
            ));
            if !spec.writes.is_empty() || !spec.keeps.is_empty() {
                let sent = Sent {
                    dirs: spec
                        .writes
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect(),
                    workspace: dir.clone(),
                    keeps: spec.keeps.clone(),
                };
                push_files = Some(files_push_script(
                    &ep.git_url(),
                    token_var,
                    run,
                    name,
                    &sent,
                    &format!("{POD_DIR}/scratch"),
                ));
            }
            if let Some(token) = ep.token() {
                pairs.push((TOKEN_VAR.into(), token.to_string()));
                secret_names.push(TOKEN_VAR.into());
            }
            travel = Some(Travel {
                run: run.to_string(),
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
        let transfers = Transfers {
            fetch: fetch.as_deref(),
            push: push.as_deref(),
            push_files: push_files.as_deref(),
        };
        let script = pod_script(
            POD_DIR,
            &transfers,
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
        notes.insert(NOTE_RUN.into(), run.to_string());
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
pub(super) struct Unstartable(String);

/// A line of the pod's log, split back into the task's stdout and stderr.
pub(super) fn split_line(line: &[u8]) -> (&[u8], Option<&[u8]>) {
    let mark = STDERR_MARK.as_bytes();
    match line.windows(mark.len()).position(|w| w == mark) {
        Some(i) => (&line[..i], Some(&line[i + mark.len()..])),
        None => (line, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pod's script as `sh` runs it (this machine's, in a scratch pod directory): what the task
    /// prints on stdout stays plain, each line it prints on stderr is marked, the exit status is
    /// the task's, and the input file is its stdin.
    #[test]
    fn the_pods_script_marks_stderr_and_keeps_the_tasks_status_and_stdin() {
        let dir = tempfile::tempdir().unwrap();
        let pod = dir.path().display().to_string();
        std::fs::create_dir_all(dir.path().join("scratch")).unwrap();
        std::fs::create_dir_all(dir.path().join("in")).unwrap();
        std::fs::write(dir.path().join("in/stdin"), "the prompt\n").unwrap();
        std::fs::write(dir.path().join("in/f0"), "settings").unwrap();
        let work = dir.path().join("work").display().to_string();
        let placed = dir
            .path()
            .join("worker/config/settings.json")
            .display()
            .to_string();
        let script = pod_script(
            &pod,
            &Transfers::default(),
            &work,
            true,
            &[("f0".into(), placed.clone())],
            &[dir.path().join("worker/tmp").display().to_string()],
        );
        // The pod's log holds the container's stdout and stderr together: so does this.
        let both = std::process::Command::new("/bin/sh")
            .args([
                "-c",
                &format!("{{ {script} }} 2>&1"),
                "ccluster-attempt",
                "/bin/sh",
                "-c",
            ])
            .arg("read -r line; echo \"got $line\"; echo oops >&2; printf partial; pwd; exit 3")
            .output()
            .unwrap();
        assert_eq!(both.status.code(), Some(3));
        let log = both.stdout;
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        for line in log.split_inclusive(|b| *b == b'\n') {
            let (o, e) = split_line(line);
            match e {
                Some(e) => {
                    stdout.extend_from_slice(o);
                    stderr.extend_from_slice(e);
                }
                None => stdout.extend_from_slice(line),
            }
        }
        assert_eq!(
            String::from_utf8_lossy(&stdout),
            format!("got the prompt\npartial{work}\n")
        );
        assert_eq!(String::from_utf8_lossy(&stderr), "oops\n");
        assert_eq!(std::fs::read_to_string(&placed).unwrap(), "settings");
        assert!(dir.path().join("worker/tmp").is_dir());
    }

    /// SIGTERM to the pod's main process (what the kubelet sends) reaches the task, which ends
    /// at once rather than at the end of the grace period.
    #[test]
    fn the_pods_script_passes_sigterm_to_the_task() {
        let dir = tempfile::tempdir().unwrap();
        let pod = dir.path().display().to_string();
        std::fs::create_dir_all(dir.path().join("scratch")).unwrap();
        let work = dir.path().join("work").display().to_string();
        let script = pod_script(&pod, &Transfers::default(), &work, false, &[], &[]);
        // A task whose shell waits for a child: the whole tree stops.
        let mut child = std::process::Command::new("/bin/sh")
            .args([
                "-c",
                &script,
                "ccluster-attempt",
                "/bin/sh",
                "-c",
                "sleep 30; echo after",
            ])
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(500));
        let started = std::time::Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = child.wait().unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert_eq!(status.code(), Some(128 + 15));
    }

    /// What the task leaves running in the background when it ends is stopped: it would hold the
    /// pod (and its stderr) open.
    #[test]
    fn the_pods_script_ends_with_the_task_and_stops_its_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let pod = dir.path().display().to_string();
        std::fs::create_dir_all(dir.path().join("scratch")).unwrap();
        let work = dir.path().join("work").display().to_string();
        let script = pod_script(&pod, &Transfers::default(), &work, false, &[], &[]);
        let started = std::time::Instant::now();
        let status = std::process::Command::new("/bin/sh")
            .args([
                "-c",
                &script,
                "ccluster-attempt",
                "/bin/sh",
                "-c",
                "sleep 30 & echo left",
            ])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert_eq!(status.code(), Some(0));
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_log_line_splits_at_the_stderr_mark() {
        assert_eq!(split_line(b"plain\n"), (&b"plain\n"[..], None));
        assert_eq!(
            split_line("half\u{1e}\u{1e}err\n".as_bytes()),
            (&b"half"[..], Some(&b"err\n"[..]))
        );
    }
}
