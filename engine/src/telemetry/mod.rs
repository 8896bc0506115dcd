//! Observability: the process's `tracing` subscriber (logs as text or JSON lines), OpenTelemetry
//! traces and metrics exported over OTLP when the standard `OTEL_*` variables ask for it, the
//! Prometheus registry behind `/metrics`, and W3C trace context for workers (`TRACEPARENT`).
//! Nothing is installed unless asked for: a run without logs, OTLP or `/metrics` pays for
//! disabled `tracing` call sites only. Documented in `docs/observability.md`.

pub mod agents;
pub mod metrics;
pub mod spans;

use std::path::PathBuf;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::Layer as _;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line, the event's fields at the top level beside `timestamp`,
    /// `level`, `message` and the spans it happened in.
    Json,
}

/// What the command line asked for.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// `--log-level`: a level (`info`) for ccluster's own logs, or full `RUST_LOG` directives
    /// (`info,kube=debug`). `None`: `RUST_LOG`, or no logs unless `--log-format json`.
    pub log_level: Option<String>,
    pub log_format: LogFormat,
    /// `--log-file`: logs go there instead of stderr (the terminal's progress stays on stderr).
    pub log_file: Option<PathBuf>,
    /// Keep metrics for a Prometheus scrape (`serve`, `apply --metrics-addr`).
    pub prometheus: bool,
    /// `service.name` when neither `OTEL_SERVICE_NAME` nor `OTEL_RESOURCE_ATTRIBUTES` names one.
    pub service: &'static str,
}

/// The installed pipeline; dropping it (or [`Telemetry::shutdown`]) flushes what is buffered.
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
    registry: Option<prometheus::Registry>,
    /// The gRPC exporter's channels live on this runtime, apart from the command's own.
    _runtime: Option<tokio::runtime::Runtime>,
}

/// Whether OTLP export of `signal` (`traces`, `metrics`) is asked for: an endpoint is set (the
/// signal's own or the general one) or `OTEL_<SIGNAL>_EXPORTER=otlp`, and neither
/// `OTEL_SDK_DISABLED=true` nor `OTEL_<SIGNAL>_EXPORTER=none` says no.
fn otlp_wanted(signal: &str) -> bool {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return false;
    }
    let upper = signal.to_ascii_uppercase();
    match var(&format!("OTEL_{upper}_EXPORTER")).as_deref() {
        Some("none") => false,
        Some("otlp") => true,
        _ => {
            var("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
                || var(&format!("OTEL_EXPORTER_OTLP_{upper}_ENDPOINT")).is_some()
        }
    }
}

/// The OTLP protocol for `signal`: its own variable, the general one, else `http/protobuf` (the
/// specification's default).
fn protocol(signal: &str) -> Result<opentelemetry_otlp::Protocol, String> {
    use opentelemetry_otlp::Protocol;
    let upper = signal.to_ascii_uppercase();
    let chosen = std::env::var(format!("OTEL_EXPORTER_OTLP_{upper}_PROTOCOL"))
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_default();
    match chosen.trim() {
        "" | "http/protobuf" => Ok(Protocol::HttpBinary),
        "http/json" => Ok(Protocol::HttpJson),
        "grpc" => Ok(Protocol::Grpc),
        other => Err(format!(
            "OTEL_EXPORTER_OTLP_PROTOCOL is `{other}`; it can be `grpc`, `http/protobuf` or `http/json`"
        )),
    }
}

fn resource(service: &'static str) -> Resource {
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
    let builder = Resource::builder();
    let builder = if named {
        builder
    } else {
        builder.with_service_name(service)
    };
    builder
        .with_attributes([opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        )])
        .build()
}

fn span_exporter(
    runtime: &tokio::runtime::Runtime,
) -> Result<opentelemetry_otlp::SpanExporter, String> {
    use opentelemetry_otlp::{Protocol, WithExportConfig as _};
    let protocol = protocol("traces")?;
    // tonic's channel spawns its worker on the runtime it is made in.
    let _entered = runtime.enter();
    let built = match protocol {
        Protocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_protocol(protocol)
            .build(),
        _ => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(protocol)
            .build(),
    };
    built.map_err(|e| format!("cannot export traces over OTLP: {e}"))
}

fn metric_exporter(
    runtime: &tokio::runtime::Runtime,
) -> Result<opentelemetry_otlp::MetricExporter, String> {
    use opentelemetry_otlp::{Protocol, WithExportConfig as _};
    let protocol = protocol("metrics")?;
    let _entered = runtime.enter();
    let built = match protocol {
        Protocol::Grpc => opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .with_protocol(protocol)
            .build(),
        _ => opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .with_protocol(protocol)
            .build(),
    };
    built.map_err(|e| format!("cannot export metrics over OTLP: {e}"))
}

/// Spans wait in a queue for the exporter: a run of thousands of tiny tasks ends three spans a
/// task within a second or two, more than the SDK's default queue (2,048) holds, and a full queue
/// drops spans. `OTEL_BSP_MAX_QUEUE_SIZE` still decides when it is set.
fn batch_config() -> opentelemetry_sdk::trace::BatchConfig {
    let builder = opentelemetry_sdk::trace::BatchConfigBuilder::default();
    if std::env::var_os("OTEL_BSP_MAX_QUEUE_SIZE").is_some() {
        builder.build()
    } else {
        builder.with_max_queue_size(65_536).build()
    }
}

/// The log filter: `--log-level` (a bare level is for ccluster's own targets, others stay at
/// `warn`), else `RUST_LOG`, else `info` for JSON logs and nothing for text. A `--log-level` that
/// is neither a level nor valid directives is an error; `RUST_LOG` is read leniently, as every
/// program reads it.
fn log_filter(settings: &Settings) -> Result<Option<tracing_subscriber::EnvFilter>, String> {
    use tracing_subscriber::EnvFilter;
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let directives = match &settings.log_level {
        Some(level) if !level.contains(['=', ',']) => {
            if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
                return Err(format!(
                    "--log-level `{level}` is not a level\n  = help: use one of {}, or RUST_LOG directives such as `info,kube=debug`",
                    LEVELS.join(", ")
                ));
            }
            format!("warn,ccluster_engine={level},ccluster={level}")
        }
        Some(directives) => {
            return EnvFilter::builder()
                .parse(directives)
                .map(Some)
                .map_err(|e| format!("--log-level `{directives}`: {e}"));
        }
        None => match std::env::var("RUST_LOG") {
            Ok(v) if !v.trim().is_empty() => v,
            _ if settings.log_format == LogFormat::Json => {
                "warn,ccluster_engine=info,ccluster=info".to_string()
            }
            _ => return Ok(None),
        },
    };
    Ok(Some(EnvFilter::builder().parse_lossy(directives)))
}

/// Installs the process's subscriber and providers. An error (a log file that cannot be opened,
/// an unknown OTLP protocol) is for the user, before anything runs.
pub fn init(settings: Settings) -> Result<Telemetry, String> {
    let traces = otlp_wanted("traces");
    let otlp_metrics = otlp_wanted("metrics");
    let runtime = if traces || otlp_metrics {
        Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("ccluster-otlp")
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the OTLP exporter's runtime: {e}"))?,
        )
    } else {
        None
    };
    let resource =
        (traces || otlp_metrics || settings.prometheus).then(|| resource(settings.service));

    let tracer = match (&runtime, traces) {
        (Some(rt), true) => Some(
            SdkTracerProvider::builder()
                .with_resource(resource.clone().expect("made above"))
                .with_span_processor(
                    opentelemetry_sdk::trace::BatchSpanProcessor::builder(span_exporter(rt)?)
                        .with_batch_config(batch_config())
                        .build(),
                )
                .build(),
        ),
        _ => None,
    };

    let registry = settings.prometheus.then(prometheus::Registry::new);
    let meter = if otlp_metrics || registry.is_some() {
        let mut builder =
            SdkMeterProvider::builder().with_resource(resource.clone().expect("made above"));
        if let (Some(rt), true) = (&runtime, otlp_metrics) {
            builder = builder.with_periodic_exporter(metric_exporter(rt)?);
        }
        if let Some(registry) = &registry {
            let exporter = opentelemetry_prometheus::exporter()
                .with_registry(registry.clone())
                .scope_info_enabled(false)
                .build()
                .map_err(|e| format!("cannot keep metrics for Prometheus: {e}"))?;
            builder = builder.with_reader(exporter);
        }
        Some(builder.build())
    } else {
        None
    };
    if let Some(provider) = &meter {
        metrics::install(provider);
    }

    let logs = log_filter(&settings)?;
    let writer = match (&logs, &settings.log_file) {
        (Some(_), Some(path)) => Some(LogWriter::File(std::sync::Arc::new(std::sync::Mutex::new(
            crate::store::private_file()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open the log file {}: {e}", path.display()))?,
        )))),
        (Some(_), None) => Some(LogWriter::Stderr),
        _ => None,
    };
    let fmt_layer = match (logs, writer) {
        (Some(filter), Some(writer)) => Some(match settings.log_format {
            LogFormat::Json => tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(true)
                .with_writer(writer)
                .with_filter(filter)
                .boxed(),
            LogFormat::Text => tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(writer)
                .with_filter(filter)
                .boxed(),
        }),
        _ => None,
    };
    // Spans go to OTLP from ccluster's own code only: the exporter's HTTP and gRPC clients trace
    // too, and exporting their spans would feed the exporter with itself. The log line of each
    // event of the run is not a span event (it would pile thousands onto the run's span); the
    // events inside an attempt (a merge's conflict, a denied tool) are. Busy and idle times are
    // not tracked: the attempt's future enters its span at every poll.
    let otel_layer = tracer.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("ccluster"))
            .with_threads(false)
            .with_location(false)
            .with_tracked_inactivity(false)
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target("ccluster_engine", tracing::Level::INFO)
                    .with_target("ccluster", tracing::Level::INFO)
                    .with_target(spans::EVENTS, tracing_subscriber::filter::LevelFilter::OFF),
            )
    });
    if fmt_layer.is_some() || otel_layer.is_some() {
        let subscriber = tracing_subscriber::registry()
            .with(fmt_layer)
            .with(otel_layer);
        tracing::subscriber::set_global_default(subscriber)
            .map_err(|e| format!("cannot install the log subscriber: {e}"))?;
    }
    if tracer.is_some() {
        TRACING.store(true, std::sync::atomic::Ordering::Relaxed);
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
    }
    Ok(Telemetry {
        tracer,
        meter,
        registry,
        _runtime: runtime,
    })
}

/// What `/metrics` answers with: the process's metrics as Prometheus text.
#[derive(Clone, Debug)]
pub struct MetricsText {
    registry: prometheus::Registry,
}

impl MetricsText {
    /// The metrics in the text exposition format (0.0.4).
    pub fn render(&self) -> String {
        use prometheus::Encoder as _;
        let mut out = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// The content type of [`MetricsText::render`].
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves `/metrics` on `addr` from a thread of its own (for `apply --metrics-addr`), until the
/// process ends; the address bound (its port, when 0 was asked for).
pub fn serve_metrics(
    addr: std::net::SocketAddr,
    metrics: MetricsText,
) -> Result<std::net::SocketAddr, String> {
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the metrics server: {e}"))?;
    std::thread::Builder::new()
        .name("ccluster-metrics".into())
        .spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let app = axum::Router::new().route(
                    "/metrics",
                    axum::routing::get(move || {
                        let metrics = metrics.clone();
                        async move {
                            (
                                [(axum::http::header::CONTENT_TYPE, PROMETHEUS_TEXT)],
                                metrics.render(),
                            )
                        }
                    }),
                );
                let _ = axum::serve(listener, app).await;
            })
        })
        .map_err(|e| format!("cannot start the metrics server: {e}"))?;
    Ok(bound)
}

impl Telemetry {
    /// The metrics for `/metrics`, when [`Settings::prometheus`] asked for them.
    pub fn metrics_text(&self) -> Option<MetricsText> {
        self.registry
            .clone()
            .map(|registry| MetricsText { registry })
    }

    /// Exports what is buffered and stops the exporters; called once at the end of the command.
    pub fn shutdown(&mut self) {
        // Shutting down exports what is left (an explicit flush first would export twice to a
        // collector that is down, each time with the exporter's retries); both signals at once,
        // so that a collector that is down delays the exit by one round of retries.
        let (tracer, meter) = (self.tracer.take(), self.meter.take());
        std::thread::scope(|scope| {
            if let Some(tracer) = tracer {
                scope.spawn(move || {
                    let _ = tracer.shutdown();
                });
            }
            if let Some(meter) = meter {
                let _ = meter.shutdown();
            }
        });
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Where log lines go.
#[derive(Clone)]
enum LogWriter {
    Stderr,
    File(std::sync::Arc<std::sync::Mutex<std::fs::File>>),
}

/// One log line's writer: a locked stderr, or the shared file.
enum LineWriter<'a> {
    Stderr(std::io::StderrLock<'a>),
    File(std::sync::MutexGuard<'a, std::fs::File>),
}

impl std::io::Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            LineWriter::Stderr(w) => w.write(buf),
            LineWriter::File(f) => f.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            LineWriter::Stderr(w) => w.flush(),
            LineWriter::File(f) => f.flush(),
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LineWriter<'a>;
    fn make_writer(&'a self) -> Self::Writer {
        match self {
            LogWriter::Stderr => LineWriter::Stderr(std::io::stderr().lock()),
            LogWriter::File(file) => {
                LineWriter::File(file.lock().unwrap_or_else(|e| e.into_inner()))
            }
        }
    }
}

/// Spans are exported: only then do they have a context worth asking for.
static TRACING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The W3C `traceparent` of `span`, when spans are exported and it has a context.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    if !TRACING.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            span_context.trace_id(),
            span_context.span_id(),
            span_context.trace_flags().to_u8()
        )
    })
}

/// Makes `span` a child of the trace context this process was started in (`TRACEPARENT`, as a
/// CI system or a parent ccluster task sets it), so a run joins its caller's trace.
pub fn join_caller_trace(span: &tracing::Span) {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let Ok(parent) = std::env::var("TRACEPARENT") else {
        return;
    };
    let mut carrier = std::collections::HashMap::new();
    carrier.insert("traceparent".to_string(), parent);
    if let Ok(state) = std::env::var("TRACESTATE") {
        carrier.insert("tracestate".to_string(), state);
    }
    let context = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
    let _ = span.set_parent(context);
}
