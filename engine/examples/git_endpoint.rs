//! Serves one commit of a repository through a run's git endpoint, for `bench/git-transport.sh`:
//! prints `url=`, `ref=` and `token=` lines, then serves until stdin ends.
//!
//!   cargo run --release --example git_endpoint -- <git common dir> <transport dir> <commit>

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::Path;

use ccluster_engine::exec::endpoint::Endpoint;

#[tokio::main]
async fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [git_dir, transport, commit] = args.as_slice() else {
        return Err("usage: git_endpoint <git common dir> <transport dir> <commit>".into());
    };
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let endpoint = Endpoint::start(
        "bench",
        Path::new(git_dir),
        Path::new(transport),
        listen,
        "127.0.0.1",
        None,
    )
    .await?;
    let start_ref = endpoint.offer("task", commit)?;
    // The token goes to the benchmark's own shell, which plays the pods.
    let mut out = std::io::stdout();
    writeln!(
        out,
        "url={}\nref={start_ref}\ntoken={}",
        endpoint.git_url(),
        endpoint.token()
    )
    .and_then(|()| out.flush())
    .map_err(|e| e.to_string())?;
    tokio::task::spawn_blocking(|| std::io::stdin().lock().lines().count())
        .await
        .map_err(|e| e.to_string())?;
    endpoint.stop().await;
    Ok(())
}
