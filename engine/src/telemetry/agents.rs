//! The `claude` CLI's own telemetry, switched on for agent workers with
//! `CCLUSTER_AGENT_TELEMETRY=1`: each worker exports its metrics, log events and spans to the
//! collector ccluster exports to, its spans children of the attempt's (through `TRACEPARENT`),
//! its resource labelled with the run and task. What version 2.1.331 sends is recorded in
//! `docs/claude-telemetry.md`.

/// Variables of ccluster's environment a worker exporting telemetry is given as they are: where
/// to send, and how.
const FORWARDED: &[&str] = &[
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
    "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
    "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT",
    "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL",
    "OTEL_EXPORTER_OTLP_LOGS_HEADERS",
    "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE",
    "OTEL_METRIC_EXPORT_INTERVAL",
];

/// Whether workers export their own telemetry (`CCLUSTER_AGENT_TELEMETRY=1`).
pub fn enabled() -> bool {
    std::env::var("CCLUSTER_AGENT_TELEMETRY").is_ok_and(|v| v == "1" || v == "true")
}

/// The environment that switches a worker's telemetry on, `labels` added to its resource.
/// Empty unless [`enabled`].
pub fn worker_env(labels: &[(&'static str, String)]) -> Vec<(String, String)> {
    if !enabled() {
        return Vec::new();
    }
    let mut env: Vec<(String, String)> = [
        ("CLAUDE_CODE_ENABLE_TELEMETRY", "1"),
        // Spans need the CLI's beta switch (2.1.331).
        ("CLAUDE_CODE_ENHANCED_TELEMETRY_BETA", "1"),
        ("OTEL_TRACES_EXPORTER", "otlp"),
        ("OTEL_METRICS_EXPORTER", "otlp"),
        ("OTEL_LOGS_EXPORTER", "otlp"),
        // One series per worker is enough: the session id would make one per session too.
        ("OTEL_METRICS_INCLUDE_SESSION_ID", "false"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for name in FORWARDED {
        if let Ok(value) = std::env::var(name) {
            env.push((name.to_string(), value));
        }
    }
    let mut resource: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            format!(
                "{k}={}",
                percent_encoding::utf8_percent_encode(v, RESOURCE_VALUE)
            )
        })
        .collect();
    if let Ok(more) = std::env::var("OTEL_RESOURCE_ATTRIBUTES") {
        resource.push(more);
    }
    env.push(("OTEL_RESOURCE_ATTRIBUTES".into(), resource.join(",")));
    env
}

/// What a resource attribute's value may not hold as it is (W3C baggage octets).
const RESOURCE_VALUE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b',')
    .add(b';')
    .add(b'\\')
    .add(b'%')
    .add(b'=');

/// The header values forwarded to workers (collector API keys), to be masked in everything the
/// run writes, as a secret's are.
pub fn forwarded_secrets() -> Vec<(String, String)> {
    if !enabled() {
        return Vec::new();
    }
    FORWARDED
        .iter()
        .filter(|name| name.ends_with("_HEADERS"))
        .filter_map(|name| Some((name.to_string(), std::env::var(name).ok()?)))
        .flat_map(|(name, value)| {
            value
                .split(',')
                .filter_map(|pair| pair.split_once('=').map(|(_, v)| v.trim().to_string()))
                .filter(|v| v.len() >= 4)
                .map(|v| (name.clone(), v))
                .collect::<Vec<_>>()
        })
        .collect()
}
