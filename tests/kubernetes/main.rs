//! The Kubernetes runner's integration tests, against a real single-node cluster they start
//! (`scripts/k8s-for-tests.sh`). A test binary of their own: cargo runs test binaries one after
//! another, so the cluster's pods never compete for the machine with the other integration
//! tests. They drive the built `ccluster` binary as the `cli` tests do, with the same helpers.

// The shared helpers serve the `cli` tests too; not all of them are used here.
#![allow(dead_code)]

#[path = "../cli/support.rs"]
mod support;

#[path = "../cli/otlp.rs"]
mod otlp;

#[path = "../cli/kubernetes.rs"]
mod kubernetes;

#[path = "../cli/k8s_rbac.rs"]
mod k8s_rbac;
