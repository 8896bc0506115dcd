//! `ccluster serve`: the HTTP API and its event streams, against the real binary.
