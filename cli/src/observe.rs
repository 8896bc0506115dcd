//! The command line's side of observability: the global log flags, and starting the engine's
//! telemetry (logs, OTLP, the Prometheus registry and `--metrics-addr`) before a command runs.
//! What they do is in docs/observability.md.

use std::path::PathBuf;

use ccluster_engine::telemetry;
use clap::{Args, ValueEnum};

/// Logs (the progress on the terminal stays as it is).
#[derive(Args)]
pub struct LogArgs {
    /// Log ccluster's spans and events at this level (`error`, `warn`, `info`, `debug`, `trace`),
    /// or by full `RUST_LOG` directives (default: `RUST_LOG`; none for text, `info` for JSON).
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Log lines as text, or as one JSON object per line (with `run`, `task`, `attempt`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Write logs to FILE (appended) instead of stderr.
    #[arg(long, global = true, value_name = "FILE")]
    log_file: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Installs the process's telemetry: the Prometheus registry for a server (`serving`) or a run
/// with `--metrics-addr` (served from now on, its address said on stderr). An error is said on
/// stderr and is the exit code.
pub fn start(
    logs: &LogArgs,
    metrics_addr: Option<std::net::SocketAddr>,
    serving: bool,
) -> Result<telemetry::Telemetry, u8> {
    let failed = |e: String| {
        eprintln!("error: {e}");
        crate::exit::INVALID_INPUT
    };
    let installed = telemetry::init(telemetry::Settings {
        log_level: logs.log_level.clone(),
        log_format: match logs.log_format {
            LogFormat::Text => telemetry::LogFormat::Text,
            LogFormat::Json => telemetry::LogFormat::Json,
        },
        log_file: logs.log_file.clone(),
        prometheus: serving || metrics_addr.is_some(),
        service: "ccluster",
    })
    .map_err(failed)?;
    if let (Some(addr), Some(metrics)) = (metrics_addr, installed.metrics_text()) {
        let bound = telemetry::serve_metrics(addr, metrics).map_err(failed)?;
        eprintln!("metrics on http://{bound}/metrics");
    }
    Ok(installed)
}
