//! Integration tests: run the built `ccluster` binary the way users do and check its output and exit
//! codes. Snapshots (insta) live in `tests/cli/snapshots/`.

mod agents;
mod apply;
mod attach;
mod budgets;
mod ci;
mod compose;
mod concurrency;
mod consistency;
mod crash;
mod dashboard;
mod dedup;
mod docker;
mod docker_agents;
mod examples;
mod forge;
mod gitsafe;
mod graphs;
mod invalid;
mod k8smodel;
mod library;
mod logs;
mod policy;
mod procs;
mod refs;
mod rehearsal_server;
mod scale;
mod schema;
mod secrets;
mod serve;
mod state_export;
mod statefs;
mod support;
mod trust;
mod untrusted;
mod workspaces;
