//! Integration tests: run the built `ccluster` binary the way users do and check its output and exit
//! codes. Snapshots (insta) live in `tests/cli/snapshots/`.

mod agents;
mod apply;
mod compose;
mod crash;
mod examples;
mod invalid;
mod library;
mod procs;
mod schema;
mod support;
mod workspaces;
