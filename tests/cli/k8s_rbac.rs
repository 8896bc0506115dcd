//! The shipped RBAC manifest (`docs/kubernetes/ccluster-runner-role.yaml`) against the real test
//! cluster: ccluster, authenticated as the manifest's service account and nothing more, runs a
//! workflow on the Kubernetes runner; with a permission taken out of the Role, it fails saying
//! which.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::kubernetes::Cluster;
use crate::support::root;
use crate::support::{Applied, Sandbox};

/// The service account the tests bind the Role to.
const ACCOUNT: &str = "ccluster-driver";

/// The shipped manifest for namespace `ns`, as its header says to fill it in.
fn manifest(ns: &str) -> String {
    std::fs::read_to_string(root().join("docs/kubernetes/ccluster-runner-role.yaml"))
        .unwrap()
        .replace("@NAMESPACE@", ns)
        .replace("@SERVICE_ACCOUNT@", ACCOUNT)
}

/// Applies `manifest` (as the cluster's admin) and writes, in `dir`, a kubeconfig that
/// authenticates as its service account with the token of the account's token secret (1.20 has
/// no `kubectl create token`).
fn kubeconfig_of_account(cluster: &Cluster, ns: &str, manifest: &str, dir: &Path) -> PathBuf {
    let file = dir.join("rbac.yaml");
    std::fs::write(&file, manifest).unwrap();
    cluster.kubectl_ok(&["apply", "-f", file.to_str().unwrap()]);
    // The token controller gives the account its secret a moment later.
    let deadline = Instant::now() + Duration::from_secs(30);
    let secret = loop {
        let (_, name) = cluster.kubectl(&[
            "get",
            "serviceaccount",
            ACCOUNT,
            "-n",
            ns,
            "-o",
            "jsonpath={.secrets[0].name}",
        ]);
        if name.starts_with(&format!("{ACCOUNT}-token-")) {
            break name;
        }
        assert!(
            Instant::now() < deadline,
            "{ACCOUNT} got no token secret: {name}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let token = cluster.kubectl_ok(&[
        "get",
        "secret",
        &secret,
        "-n",
        ns,
        "-o",
        "go-template={{.data.token | base64decode}}",
    ]);
    let server = cluster.kubectl_ok(&[
        "config",
        "view",
        "--raw",
        "-o",
        "jsonpath={.clusters[0].cluster.server}",
    ]);
    let ca = cluster.kubectl_ok(&[
        "config",
        "view",
        "--raw",
        "-o",
        "jsonpath={.clusters[0].cluster.certificate-authority-data}",
    ]);
    let config = dir.join("kubeconfig");
    std::fs::write(
        &config,
        format!(
            r#"apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {{server: "{}", certificate-authority-data: "{}"}}
users:
- name: {ACCOUNT}
  user: {{token: "{token}"}}
contexts:
- name: test
  context: {{cluster: test, user: {ACCOUNT}, namespace: {ns}}}
current-context: test
"#,
            server.trim(),
            ca.trim()
        ),
    )
    .unwrap();
    config
}

/// Three shell tasks on a Kubernetes runner in `ns`.
fn three_tasks(ns: &str) -> Sandbox {
    Sandbox::new(&format!(
        r#"version = 1
[runners.k8s]
kind = "kubernetes"
image = "ccluster-test/debian:1"
namespace = "{ns}"
pull = "never"

[tasks.each]
runner = "k8s"
map = ["a", "b", "c"]
run = "echo task {{{{ item }}}}"
retry = {{ limit = 0 }}
"#
    ))
}

/// `apply` in the sandbox with only the service account's kubeconfig; killed after two minutes
/// (a permission the runner needs to follow its pods, when missing, leaves it waiting).
fn apply_as_account(cluster: &Cluster, s: &Sandbox, kubeconfig: &Path) -> Applied {
    let mut child = cluster
        .ccluster(s, &["apply", "--output", "json", "-j", "3"])
        .env("KUBECONFIG", kubeconfig)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "apply did not end within two minutes: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Applied::from_output(child.wait_with_output().unwrap())
}

#[test]
fn the_shipped_role_is_enough_for_the_runner() {
    let cluster = Cluster::get();
    let ns = cluster.namespace("rbac-ok");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = kubeconfig_of_account(&cluster, &ns, &manifest(&ns), dir.path());
    // The account is really confined: it cannot see another namespace.
    let (allowed, out) = cluster.kubectl(&[
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "get",
        "jobs",
        "-n",
        "default",
    ]);
    assert!(!allowed && out.contains("forbidden"), "{out}");
    // Worktree tasks on `network = "none"`: their workspaces travel through the run's git
    // endpoint (its token in the run's Secret), under the run's NetworkPolicy; the end of the
    // run sweeps both away.
    let s = Sandbox::in_repo(
        &format!(
            r#"version = 1
[runners.k8s]
kind = "kubernetes"
image = "ccluster-test/debian:1"
namespace = "{ns}"
pull = "never"
network = "none"

[tasks.each]
runner = "k8s"
workspace = "worktree"
map = ["a", "b", "c"]
run = "echo task {{{{ item }}}}; echo {{{{ item }}}} > {{{{ item }}}}.txt"
retry = {{ limit = 0 }}
"#
        ),
        &[("README", "hello\n")],
    );
    // (An attempt whose Secret or NetworkPolicy cannot be made does not start.)
    let run = apply_as_account(&cluster, &s, &kubeconfig);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert_eq!(run.tasks("task_succeeded").len(), 3, "{}", run.stdout);
    // The log came through (pods/log), and the pod's work came back (the endpoint).
    let logs = s.command(&["logs", "latest", "each[1]"]).output().unwrap();
    let logs = String::from_utf8_lossy(&logs.stdout);
    assert!(logs.contains("task b"), "{logs}");
    let run_id = s.run_id();
    let file = crate::support::git(
        s.path(),
        &["show", &format!("refs/ccluster/runs/{run_id}/each/1:b.txt")],
    );
    assert_eq!(file.trim(), "b");
    // The sweep at the end (list, delete) took the Secret and the NetworkPolicy.
    cluster.assert_emptied(&ns);
}

#[test]
fn without_creating_jobs_every_task_fails_naming_the_permission() {
    let cluster = Cluster::get();
    let ns = cluster.namespace("rbac-nojobs");
    let dir = tempfile::tempdir().unwrap();
    let shipped = manifest(&ns);
    // Everything on Jobs but `create`.
    let reduced = shipped.replace(
        "resources: [\"jobs\"]\n    verbs: [\"create\", ",
        "resources: [\"jobs\"]\n    verbs: [",
    );
    assert_ne!(
        reduced, shipped,
        "the manifest's Job rule changed: update this test"
    );
    let kubeconfig = kubeconfig_of_account(&cluster, &ns, &reduced, dir.path());
    let s = three_tasks(&ns);
    let run = apply_as_account(&cluster, &s, &kubeconfig);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    let failed = run.of("task_failed");
    assert_eq!(failed.len(), 3, "{}", run.stdout);
    for f in failed {
        let message = f["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("cannot make Job")
                && message.contains(r#"cannot create resource "jobs""#)
                && message.contains("(403)"),
            "{f}"
        );
    }
    cluster.assert_emptied(&ns);
}

#[test]
fn without_reading_the_namespace_nothing_starts_and_the_docs_are_named() {
    let cluster = Cluster::get();
    let ns = cluster.namespace("rbac-nons");
    let dir = tempfile::tempdir().unwrap();
    let shipped = manifest(&ns);
    let reduced = shipped.replace(
        r#"resources: ["namespaces"]"#,
        r#"resources: ["limitranges"]"#,
    );
    assert_ne!(
        reduced, shipped,
        "the manifest's namespace rule changed: update this test"
    );
    let kubeconfig = kubeconfig_of_account(&cluster, &ns, &reduced, dir.path());
    let s = three_tasks(&ns);
    let run = apply_as_account(&cluster, &s, &kubeconfig);
    assert_eq!(run.code, 2, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stderr
            .contains(&format!("refuses to show namespace `{ns}`"))
            && run.stderr.contains("docs/runners.md"),
        "{}",
        run.stderr
    );
    assert!(run.of("task_started").is_empty(), "{}", run.stdout);
    cluster.assert_emptied(&ns);
}
