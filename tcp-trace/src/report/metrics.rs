//! `--metrics ADDR`: the run's counters as an OpenMetrics (Prometheus) endpoint at `/metrics`.
//!
//! Fed by the report pipeline from the same events, flows and reset diagnoses the text and JSON
//! output get, plus what only the live tracer knows (events lost, the ring's fill). Labels are
//! bounded: no pid, port or address; the process name and container of the socket's owner are
//! kept for at most [`DEFAULT_OWNER_CAP`] (process, container) pairs, the rest are `other`.
//! The README's "Metrics" section lists every series and its cardinality.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::Duration,
};

use anyhow::{Context, Result};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::{
    decode::{Hook, Owner},
    flows::FlowReport,
    resets::ResetDiagnosis,
};

/// How many distinct (process, container) pairs get their own label values.
pub(crate) const DEFAULT_OWNER_CAP: usize = 50;

/// The label value for whatever is over a cap.
pub(crate) const OTHER: &str = "other";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResetLabels {
    direction: &'static str,
    cause: &'static str,
    /// The kernel's `enum sk_rst_reason` name (without `SK_RST_REASON_`), or `none`.
    reason: String,
    /// The TcpExt counter of /proc/net/netstat this reset bumps (node_exporter's
    /// `node_netstat_TcpExt_<name>`), or `none`.
    tcpext: &'static str,
    process: String,
    container: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowLabels {
    verdict: &'static str,
    end: &'static str,
    process: String,
    container: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HookLabels {
    hook: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LostLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    rule: String,
}

/// The metrics of one run, shared by the pipeline (which counts) and the HTTP server.
pub(crate) struct Metrics {
    registry: Registry,
    resets: Family<ResetLabels, Counter>,
    flows: Family<FlowLabels, Counter>,
    events: Family<HookLabels, Counter>,
    lost: Family<LostLabels, Counter>,
    divergent: Family<RuleLabels, Counter>,
    hooks: Family<HookLabels, Gauge>,
    flows_in_flight: Gauge,
    ring_fill: Gauge<f64, AtomicU64>,
    owners: Mutex<OwnerCap>,
    /// Rules seen so far (the model's rules are a fixed set; the cap guards against a bug).
    rules: Mutex<HashSet<String>>,
}

/// Which (process, container) pairs have label values of their own.
struct OwnerCap {
    seen: HashSet<(String, String)>,
    cap: usize,
}

/// At most this many distinct divergence rules are labelled; the model has fewer.
const RULE_CAP: usize = 100;

impl Metrics {
    pub(crate) fn new(owner_cap: usize) -> Self {
        let mut registry = Registry::with_prefix("tcp_trace");
        let resets = Family::<ResetLabels, Counter>::default();
        registry.register(
            "resets",
            "TCP resets (and silent timeout aborts) on traced flows, by direction, cause, kernel \
             reset reason (sk_rst_reason) and TcpExt counter",
            resets.clone(),
        );
        let flows = Family::<FlowLabels, Counter>::default();
        registry.register(
            "flows_ended",
            "Connections whose teardown ended, by verdict against the reference model and how the \
             flow ended",
            flows.clone(),
        );
        let events = Family::<HookLabels, Counter>::default();
        registry.register("events", "Kernel events received, by hook", events.clone());
        let lost = Family::<LostLabels, Counter>::default();
        registry.register(
            "events_lost",
            "Kernel events lost before reaching tcp-trace: ring_full (the ring buffer was full) \
             or recursion (a program did not run because another was running on the CPU)",
            lost.clone(),
        );
        let divergent = Family::<RuleLabels, Counter>::default();
        registry.register(
            "flows_diverging",
            "Flows whose kernel behaviour diverged from the reference model, by the model rule \
             (and kernel function) at the first divergence",
            divergent.clone(),
        );
        let hooks = Family::<HookLabels, Gauge>::default();
        registry.register(
            "hook_attached",
            "1 if the hook is attached, 0 if it could not be (`tcp-trace doctor` says why)",
            hooks.clone(),
        );
        let flows_in_flight = Gauge::default();
        registry.register(
            "flows_in_flight",
            "Flows being followed now (seen, not yet ended)",
            flows_in_flight.clone(),
        );
        let ring_fill = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "ring_fill_ratio",
            "How full the kernel's event ring buffer was at the last reading (0 to 1)",
            ring_fill.clone(),
        );
        // Every reason appears from the start, so that a rate over it is defined at zero.
        for reason in ["ring_full", "recursion"] {
            let _ = lost.get_or_create(&LostLabels { reason });
        }
        Self {
            registry,
            resets,
            flows,
            events,
            lost,
            divergent,
            hooks,
            flows_in_flight,
            ring_fill,
            owners: Mutex::new(OwnerCap {
                seen: HashSet::new(),
                cap: owner_cap,
            }),
            rules: Mutex::new(HashSet::new()),
        }
    }

    /// The (process, container) label values of `owner`, capped.
    fn owner_labels(&self, owner: Option<&Owner>, container: Option<&str>) -> (String, String) {
        let process = owner.map_or("unknown", |o| o.comm.as_str()).to_string();
        let container = container.unwrap_or("none").to_string();
        let pair = (process, container);
        let mut cap = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        if cap.seen.contains(&pair) {
            return pair;
        }
        if cap.seen.len() < cap.cap {
            cap.seen.insert(pair.clone());
            return pair;
        }
        (OTHER.to_string(), OTHER.to_string())
    }

    /// Which hooks are attached (by the names the events carry).
    pub(crate) fn set_hook_attached(&self, hook: &'static str, attached: bool) {
        self.hooks
            .get_or_create(&HookLabels { hook })
            .set(attached as i64);
    }

    pub(crate) fn event(&self, hook: Hook) {
        self.events
            .get_or_create(&HookLabels {
                hook: hook_name(hook),
            })
            .inc();
    }

    pub(crate) fn reset(&self, d: &ResetDiagnosis, container: Option<&str>) {
        let (process, container) = self.owner_labels(d.owner.as_ref(), container);
        let labels = ResetLabels {
            direction: match d.direction {
                crate::resets::Direction::Sent => "sent",
                crate::resets::Direction::Received => "received",
                crate::resets::Direction::Silent => "silent",
            },
            cause: d.cause.name(),
            reason: d.kernel_reason.clone().unwrap_or_else(|| "none".into()),
            tcpext: d.counter.unwrap_or("none"),
            process,
            container,
        };
        self.resets.get_or_create(&labels).inc();
    }

    /// A flow whose teardown ended.
    pub(crate) fn flow(&self, report: &FlowReport, container: Option<&str>) {
        let (process, container) = self.owner_labels(report.owner.as_ref(), container);
        self.flows
            .get_or_create(&FlowLabels {
                verdict: report.verdict.label(),
                end: end_name(report.end),
                process,
                container,
            })
            .inc();
        if let crate::flows::Verdict::Diverges { rule, .. } = &report.verdict {
            let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
            let rule = if rules.contains(rule) || rules.len() < RULE_CAP {
                rules.insert(rule.clone());
                rule.clone()
            } else {
                OTHER.to_string()
            };
            self.divergent.get_or_create(&RuleLabels { rule }).inc();
        }
    }

    /// The kernel's lost-event count for `reason` (`ring_full`, `recursion`) is now `total`.
    pub(crate) fn set_lost_total(&self, reason: &'static str, total: u64) {
        let c = self.lost.get_or_create(&LostLabels { reason });
        let now = c.get();
        if total > now {
            c.inc_by(total - now);
        }
    }

    pub(crate) fn set_flows_in_flight(&self, n: usize) {
        self.flows_in_flight.set(n as i64);
    }

    pub(crate) fn set_ring_fill(&self, ratio: f64) {
        self.ring_fill.set(ratio);
    }

    /// The OpenMetrics text exposition.
    pub(crate) fn openmetrics(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The Prometheus text format 0.0.4, for clients that do not ask for OpenMetrics.
    pub(crate) fn prometheus_text(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// The hook's name as in `--json` (`tcp_close`, `inet_sock_set_state`, ...).
pub(crate) fn hook_name(hook: Hook) -> &'static str {
    match hook {
        Hook::TcpClose => "tcp_close",
        Hook::TcpFin => "tcp_fin",
        Hook::TcpSendFin => "tcp_send_fin",
        Hook::TcpSendActiveReset => "tcp_send_active_reset",
        Hook::TcpTimeWait => "tcp_time_wait",
        Hook::TcpTimewaitStateProcess => "tcp_timewait_state_process",
        Hook::TcpTimewaitStateProcessReturn => "tcp_timewait_state_process_return",
        Hook::InetSockSetState => "inet_sock_set_state",
        Hook::TcpSendReset => "tcp_send_reset",
        Hook::TcpReceiveReset => "tcp_receive_reset",
        Hook::TcpDestroySock => "tcp_destroy_sock",
    }
}

fn end_name(end: crate::flows::FlowEnd) -> &'static str {
    use crate::flows::FlowEnd as E;
    match end {
        E::Destroyed => "destroyed",
        E::TimeWaitKilled => "time_wait_killed",
        E::TimeWaitExpired => "time_wait_expired",
        E::TimeWaitUnseen => "time_wait_unseen",
        E::Reused => "reused",
        E::IdleEvicted => "idle_evicted",
        E::CapacityEvicted => "capacity_evicted",
        E::TraceEnded => "trace_ended",
    }
}

/// The `Content-Type` of [`Metrics::openmetrics`].
pub(crate) const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds `addr` now (so that a port in use is an error at start, naming the address) and
/// returns the listener for [`serve`].
pub(crate) async fn bind(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!(
            "--metrics {addr}: cannot listen there (is the port in use? the form is HOST:PORT, \
             e.g. 127.0.0.1:9464 or [::]:9464)"
        )
    })
}

/// Answers HTTP requests on `listener` for as long as the trace runs: `GET /metrics` gets the
/// metrics, `/` a pointer to it, anything else 404. One request per connection, bounded reads,
/// a connection that stalls is dropped.
pub(crate) async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // EMFILE and the like: back off rather than spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), answer(stream, &metrics)).await;
        });
    }
}

async fn answer(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() > 16 * 1024 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let request = String::from_utf8_lossy(&buf);
    let (status, content_type, body) = respond(&request, metrics);
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if !request.starts_with("HEAD ") {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

/// Status line, content type and body for one request (its head, as text).
fn respond(request: &str, metrics: &Metrics) -> (&'static str, &'static str, String) {
    let mut lines = request.lines();
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let (method, target) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    if method != "GET" && method != "HEAD" {
        return (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".into(),
        );
    }
    let path = target.split('?').next().unwrap_or("");
    match path {
        "/metrics" => {
            let openmetrics = lines.any(|l| {
                let l = l.to_ascii_lowercase();
                l.starts_with("accept:") && l.contains("application/openmetrics-text")
            });
            if openmetrics {
                ("200 OK", OPENMETRICS_CONTENT_TYPE, metrics.openmetrics())
            } else {
                (
                    "200 OK",
                    prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                    metrics.prometheus_text(),
                )
            }
        }
        "/" => (
            "200 OK",
            "text/plain",
            "tcp-trace: metrics at /metrics\n".into(),
        ),
        _ => (
            "404 Not Found",
            "text/plain",
            "not found: try /metrics\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{Comm, OwnerSource};

    fn owner(comm: &str) -> Owner {
        Owner {
            pid: 1,
            comm: Comm::from_kernel(comm.as_bytes()),
            source: OwnerSource::Kernel,
            cgroup_id: 0,
        }
    }

    #[test]
    fn owner_labels_are_capped_with_an_other_bucket() {
        let m = Metrics::new(2);
        assert_eq!(
            m.owner_labels(Some(&owner("a")), None),
            ("a".into(), "none".into())
        );
        assert_eq!(
            m.owner_labels(Some(&owner("b")), Some("docker:0123456789ab")),
            ("b".into(), "docker:0123456789ab".into())
        );
        assert_eq!(
            m.owner_labels(Some(&owner("c")), None),
            (OTHER.into(), OTHER.into())
        );
        // A pair seen before the cap keeps its labels.
        assert_eq!(
            m.owner_labels(Some(&owner("a")), None),
            ("a".into(), "none".into())
        );
    }

    #[test]
    fn scrape_answers_openmetrics_when_asked_and_text_otherwise() {
        let m = Metrics::new(DEFAULT_OWNER_CAP);
        m.event(Hook::TcpSendReset);
        m.set_lost_total("ring_full", 7);
        m.set_lost_total("ring_full", 5);
        let (status, ct, body) = respond(
            "GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text;version=1.0.0\r\n\r\n",
            &m,
        );
        assert_eq!((status, ct), ("200 OK", OPENMETRICS_CONTENT_TYPE));
        assert!(
            body.contains("tcp_trace_events_total{hook=\"tcp_send_reset\"} 1"),
            "{body}"
        );
        assert!(
            body.contains("tcp_trace_events_lost_total{reason=\"ring_full\"} 7"),
            "{body}"
        );
        assert!(
            body.contains("tcp_trace_events_lost_total{reason=\"recursion\"} 0"),
            "{body}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");
        let (_, ct, body) = respond("GET /metrics HTTP/1.0\r\n\r\n", &m);
        assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
        assert!(!body.contains("# EOF"), "{body}");
        assert_eq!(respond("GET /nope HTTP/1.1\r\n\r\n", &m).0, "404 Not Found");
        assert_eq!(
            respond("POST /metrics HTTP/1.1\r\n\r\n", &m).0,
            "405 Method Not Allowed"
        );
    }
}
