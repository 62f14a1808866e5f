//! Logs, traces and metrics.
//!
//! - Logs: readable text for a terminal, or JSON lines (`--log-json`), filtered by
//!   `BATON_LOG`.
//! - Traces: one trace per task. At submit a task gets a W3C trace context
//!   ([`new_trace_parent`], stored in `tasks.trace_parent`); every span of that task's
//!   work, in any actor, after any restart and on any node, is made a child of it
//!   ([`task_span`]). With `telemetry.otlp_endpoint` set, spans are exported over OTLP
//!   (http/protobuf or grpc); without it there is no exporter, only logs.
//! - Metrics: OpenTelemetry instruments ([`metrics`]), exported over OTLP when an
//!   endpoint is set and always served at `GET /metrics` in the Prometheus text format.

use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry::{KeyValue, global};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use rand::Rng;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::TelemetrySettings;

/// How often metrics are pushed over OTLP.
pub const METRICS_EXPORT_INTERVAL: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot build the OTLP {what} exporter for {endpoint}: {message}")]
    Exporter {
        what: &'static str,
        endpoint: String,
        message: String,
    },
    #[error("cannot build the Prometheus exporter: {0}")]
    Prometheus(String),
}

/// Keeps the providers alive; flushes and shuts them down when dropped.
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
    meter_provider: Option<SdkMeterProvider>,
    /// The registry behind `GET /metrics`.
    pub registry: prometheus::Registry,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(t) = self.tracer_provider.take() {
            let _ = t.shutdown();
        }
        if let Some(m) = self.meter_provider.take() {
            let _ = m.shutdown();
        }
    }
}

/// Logs only: for the commands that are not the service.
pub fn init_logs(default_filter: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BATON_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colour());
    let registry = tracing_subscriber::registry().with(filter);
    let _ = if json {
        registry.with(fmt.json()).try_init()
    } else {
        registry.with(fmt).try_init()
    };
}

/// Colour in text logs only on a terminal, and never with `NO_COLOR` set (no-color.org):
/// under systemd or in a file, lines carry no escape codes.
fn colour() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Logs, traces and metrics for `baton serve`.
pub fn init_service(settings: &TelemetrySettings, json: bool) -> Result<Telemetry, TelemetryError> {
    global::set_text_map_propagator(TraceContextPropagator::new());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(settings.service_name.clone())
        .build();
    let registry = prometheus::Registry::new();
    let prom = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .build()
        .map_err(|e| TelemetryError::Prometheus(e.to_string()))?;
    let mut meters = SdkMeterProvider::builder()
        .with_resource(resource.clone())
        .with_reader(prom);
    let mut tracer_provider = None;
    if let Some(endpoint) = settings.otlp_endpoint.as_deref() {
        let (provider, reader) = otlp_exporters(settings, endpoint, resource.clone())?;
        tracer_provider = Some(provider);
        meters = reader.add_to(meters);
    }
    let meter_provider = meters.build();
    global::set_meter_provider(meter_provider.clone());

    let filter = tracing_subscriber::EnvFilter::try_from_env("BATON_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,sea_orm=warn"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colour());
    let otel = tracer_provider.as_ref().map(|p| {
        use opentelemetry::trace::TracerProvider;
        tracing_opentelemetry::layer().with_tracer(p.tracer("baton"))
    });
    let subscriber = tracing_subscriber::registry().with(filter).with(otel);
    let _ = if json {
        subscriber.with(fmt.json()).try_init()
    } else {
        subscriber.with(fmt).try_init()
    };
    Ok(Telemetry {
        tracer_provider,
        meter_provider: Some(meter_provider),
        registry,
    })
}

/// A metric reader that pushes over OTLP.
pub enum OtlpReader {
    /// http/protobuf: the SDK's own thread with a blocking HTTP client.
    Http(opentelemetry_sdk::metrics::PeriodicReader<opentelemetry_otlp::MetricExporter>),
    /// grpc: tonic needs tokio, so the reader runs on the tokio runtime.
    Grpc(
        opentelemetry_sdk::metrics::periodic_reader_with_async_runtime::PeriodicReader<
            opentelemetry_otlp::MetricExporter,
        >,
    ),
}

/// The OTLP span pipeline and metric reader for `endpoint`: http/protobuf posts to
/// `{endpoint}/v1/traces` and `{endpoint}/v1/metrics`; grpc uses the endpoint as is.
pub fn otlp_exporters(
    settings: &TelemetrySettings,
    endpoint: &str,
    resource: opentelemetry_sdk::Resource,
) -> Result<(SdkTracerProvider, OtlpReader), TelemetryError> {
    let err = |what: &'static str| {
        move |e: opentelemetry_otlp::ExporterBuildError| TelemetryError::Exporter {
            what,
            endpoint: endpoint.to_string(),
            message: e.to_string(),
        }
    };
    if settings.protocol == "grpc" {
        use opentelemetry_sdk::runtime::Tokio;
        let spans = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(err("span"))?;
        let metrics = opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(err("metric"))?;
        let processor =
            opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(spans, Tokio)
                .build();
        let provider = SdkTracerProvider::builder()
            .with_resource(resource)
            .with_span_processor(processor)
            .build();
        let reader = opentelemetry_sdk::metrics::periodic_reader_with_async_runtime::PeriodicReader::builder(
            metrics, Tokio,
        )
        .with_interval(METRICS_EXPORT_INTERVAL)
        .build();
        return Ok((provider, OtlpReader::Grpc(reader)));
    }
    let base = endpoint.trim_end_matches('/');
    let spans = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{base}/v1/traces"))
        .build()
        .map_err(err("span"))?;
    let metrics = opentelemetry_otlp::MetricExporter::builder()
        .with_http()
        .with_endpoint(format!("{base}/v1/metrics"))
        .build()
        .map_err(err("metric"))?;
    let provider = SdkTracerProvider::builder()
        .with_resource(resource)
        .with_batch_exporter(spans)
        .build();
    let reader = opentelemetry_sdk::metrics::PeriodicReader::builder(metrics)
        .with_interval(METRICS_EXPORT_INTERVAL)
        .build();
    Ok((provider, OtlpReader::Http(reader)))
}

impl OtlpReader {
    /// Adds the reader to a meter provider.
    fn add_to(
        self,
        b: opentelemetry_sdk::metrics::MeterProviderBuilder,
    ) -> opentelemetry_sdk::metrics::MeterProviderBuilder {
        match self {
            OtlpReader::Http(r) => b.with_reader(r),
            OtlpReader::Grpc(r) => b.with_reader(r),
        }
    }
}

/// A fresh W3C trace context (`00-<trace id>-<span id>-01`) for a new task.
pub fn new_trace_parent() -> String {
    let mut rng = rand::rng();
    let trace: u128 = rng.random_range(1..=u128::MAX);
    let span: u64 = rng.random_range(1..=u64::MAX);
    format!("00-{trace:032x}-{span:016x}-01")
}

/// The trace id of a `traceparent`, if it is well-formed.
pub fn trace_id_of(trace_parent: &str) -> Option<&str> {
    let mut parts = trace_parent.split('-');
    let (_, id) = (parts.next()?, parts.next()?);
    (id.len() == 32).then_some(id)
}

/// The OpenTelemetry context a `traceparent` names.
pub fn context_of(trace_parent: &str) -> opentelemetry::Context {
    let mut carrier = std::collections::HashMap::new();
    carrier.insert("traceparent".to_string(), trace_parent.to_string());
    TraceContextPropagator::new().extract(&carrier)
}

/// Makes `span` a child of the task's trace.
pub fn join_task_trace(span: &tracing::Span, trace_parent: Option<&str>) {
    if let Some(tp) = trace_parent {
        let _ = span.set_parent(context_of(tp));
    }
}

/// The `traceparent` of `span` (for an agent's `TRACEPARENT`), or `fallback` when spans
/// are not exported.
pub fn trace_parent_of(span: &tracing::Span, fallback: Option<&str>) -> String {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    } else {
        fallback.unwrap_or_default().to_string()
    }
}

/// A span of one task's work, with the task, stage, job, run and attempt as fields,
/// in the task's trace.
#[macro_export]
macro_rules! task_span {
    ($name:literal, $task:expr, $job:expr, $run_id:expr) => {{
        // A root in the process: a task's work never sits inside another task's span
        // (ractor runs a handler inside its sender's span), so each log line carries
        // its own task's fields only; the task's trace is joined below.
        let span = tracing::info_span!(
            parent: None,
            $name,
            task = %$task.key,
            stage = %$job.stage,
            job_id = $job.id,
            run_id = $run_id,
            attempt = $job.attempt,
            otel.status_code = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        $crate::telemetry::join_task_trace(&span, $task.trace_parent.as_deref());
        span
    }};
}

/// baton's metrics instruments.
pub struct Metrics {
    pub claims: opentelemetry::metrics::Counter<u64>,
    pub advances: opentelemetry::metrics::Counter<u64>,
    pub reaps: opentelemetry::metrics::Counter<u64>,
    pub retries: opentelemetry::metrics::Counter<u64>,
    pub effects: opentelemetry::metrics::Counter<u64>,
    pub queue_depth: opentelemetry::metrics::Gauge<u64>,
    pub running_jobs: opentelemetry::metrics::Gauge<u64>,
    pub advance_latency: opentelemetry::metrics::Histogram<f64>,
    pub run_duration: opentelemetry::metrics::Histogram<f64>,
    /// Tokens agents reported, by stage and direction (`in`, `out`).
    pub agent_tokens: opentelemetry::metrics::Counter<u64>,
    /// Cost agents reported, in US dollars, by stage.
    pub agent_cost: opentelemetry::metrics::Counter<f64>,
    /// Turns agents reported, by stage.
    pub agent_turns: opentelemetry::metrics::Counter<u64>,
}

impl Metrics {
    /// The instruments of `meter`: in production the global meter provider's (set by
    /// [`init_service`]), in tests one of their own.
    pub fn new(m: &opentelemetry::metrics::Meter) -> Metrics {
        Metrics {
            claims: m
                .u64_counter("baton.claims")
                .with_description("Claims decided, by outcome")
                .build(),
            advances: m
                .u64_counter("baton.advances")
                .with_description("Jobs advanced")
                .build(),
            reaps: m
                .u64_counter("baton.reaps")
                .with_description("Runs reaped, by tier")
                .build(),
            retries: m
                .u64_counter("baton.retries")
                .with_description("Attempts scheduled again")
                .build(),
            effects: m
                .u64_counter("baton.effects")
                .with_description("Effect attempts, by kind and outcome")
                .build(),
            queue_depth: m
                .u64_gauge("baton.queue.depth")
                .with_description("Queued jobs")
                .build(),
            running_jobs: m
                .u64_gauge("baton.jobs.running")
                .with_description("Running jobs")
                .build(),
            advance_latency: m
                .f64_histogram("baton.advance.latency")
                .with_unit("s")
                .with_description("An agent's recorded exit to its won claim")
                .with_boundaries(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ])
                .build(),
            run_duration: m
                .f64_histogram("baton.run.duration")
                .with_unit("s")
                .with_description("Agent run time, start to exit")
                .with_boundaries(vec![
                    1.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
                ])
                .build(),
            agent_tokens: m
                .u64_counter("baton.agent.tokens")
                .with_description("Tokens agents reported, by stage and direction")
                .build(),
            agent_cost: m
                .f64_counter("baton.agent.cost_usd")
                .with_description("Cost agents reported, in US dollars, by stage")
                .build(),
            agent_turns: m
                .u64_counter("baton.agent.turns")
                .with_description("Turns agents reported, by stage")
                .build(),
        }
    }

    /// Adds what one run's agent reported it used.
    pub fn record_usage(&self, stage: &str, u: crate::model::Usage) {
        let stage = kv("stage", stage.to_string());
        for (direction, n) in [("in", u.tokens_in), ("out", u.tokens_out)] {
            if let Some(n) = n {
                self.agent_tokens.add(
                    n.max(0) as u64,
                    &[stage.clone(), kv("direction", direction)],
                );
            }
        }
        if let Some(c) = u.cost_microusd {
            self.agent_cost
                .add(c.max(0) as f64 / 1_000_000.0, std::slice::from_ref(&stage));
        }
        if let Some(t) = u.turns {
            self.agent_turns.add(t.max(0) as u64, &[stage]);
        }
    }

    /// The instruments of the global meter provider.
    pub fn global() -> Metrics {
        Metrics::new(&global::meter("baton"))
    }
}

pub fn kv(k: &'static str, v: impl Into<opentelemetry::Value>) -> KeyValue {
    KeyValue::new(k, v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_parents_are_well_formed_and_parse() {
        let tp = new_trace_parent();
        assert_eq!(tp.len(), 55, "{tp}");
        let id = trace_id_of(&tp).unwrap();
        let cx = context_of(&tp);
        assert_eq!(cx.span().span_context().trace_id().to_string(), id);
        assert_ne!(new_trace_parent(), tp);
    }
}
