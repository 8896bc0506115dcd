//! What the Kubernetes runner sees of its Jobs: one watch of the Jobs and one of their pods,
//! shared by all attempts, and how a pod's state reads as the attempt's end.

use super::*;

/// What a pod was last seen as, for the attempt that waits for it.
#[derive(Clone, Default)]
pub(super) struct Seen {
    pub(super) job: Option<Job>,
    pub(super) job_gone: bool,
    /// The Job's pods by name; `None`: deleted.
    pub(super) pods: BTreeMap<String, Option<Pod>>,
}

/// One watch of the runner's Jobs and one of their pods, shared by all attempts: each attempt
/// follows what is seen of its own Job.
pub(super) struct Hub {
    pub(super) seen: Mutex<HashMap<String, watch::Sender<Seen>>>,
}

impl Hub {
    pub(super) fn start(client: kube::Client, namespace: &str, selector: &str) -> Arc<Hub> {
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
    pub(super) fn job_of<K: kube::Resource>(object: &K) -> Option<String> {
        let meta = object.meta();
        meta.labels
            .as_ref()
            .and_then(|l| l.get(LABEL_JOB).cloned())
            .or_else(|| meta.name.clone())
    }

    pub(super) async fn follow<K, S>(
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

    pub(super) fn update(&self, job: &str, change: impl FnOnce(&mut Seen)) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let sender = seen
            .entry(job.to_string())
            .or_insert_with(|| watch::channel(Seen::default()).0);
        sender.send_modify(change);
    }

    /// What is seen of `job`, from what was seen before (an adopted Job that has ended will not
    /// change again: its state so far counts as news).
    pub(super) fn subscribe(&self, job: &str) -> watch::Receiver<Seen> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut receiver = seen
            .entry(job.to_string())
            .or_insert_with(|| watch::channel(Seen::default()).0)
            .subscribe();
        receiver.mark_changed();
        receiver
    }

    pub(super) fn forget(&self, job: &str) {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(job);
    }
}

/// How a Job's pod ended, as far as it can be told from what the watch saw.
#[derive(Debug, PartialEq)]
pub(super) enum PodEnd {
    /// Still going (or not started yet).
    NotYet,
    Exited(i32),
    OutOfMemory,
    TimedOut,
    Failed(FailureClass, String),
}

/// Reads the Job and its pod as last seen: whether the attempt is over, and how.
pub(super) fn pod_end(
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
pub(super) fn past_deadline(seen: &Seen) -> bool {
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
pub(super) fn container_started(seen: &Seen) -> Option<String> {
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
pub(super) fn unschedulable(seen: &Seen) -> bool {
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
