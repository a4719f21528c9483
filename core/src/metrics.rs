//! Prometheus text exposition of the components' live state.
//!
//! Every component makes one JSON report of its live state (the one it
//! sends the console every second). [`Exposition::report`] turns such a
//! report into metric families, so a component's own `/metrics` and the
//! console's `/metrics` (every component's latest report) name and label
//! the same series the same way. Names and labels are listed in
//! `k8s/README` and used by the Grafana dashboard in `k8s/grafana/`.

use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Gauge or counter (the `# TYPE` of a family).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Gauge,
    Counter,
}

#[derive(Debug, Default)]
struct Family {
    help: &'static str,
    kind: &'static str,
    samples: String,
}

/// Metric families being collected; [`Exposition::render`] writes them in
/// the text format, each family's samples together under one `# TYPE`.
#[derive(Debug, Default)]
pub struct Exposition {
    families: BTreeMap<&'static str, Family>,
}

/// A label value escaped for the text format.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Exposition {
    /// Adds one sample of family `name`.
    pub fn sample(
        &mut self,
        name: &'static str,
        kind: Kind,
        help: &'static str,
        labels: &[(&str, &str)],
        value: impl std::fmt::Display,
    ) {
        let f = self.families.entry(name).or_insert_with(|| Family {
            help,
            kind: match kind {
                Kind::Gauge => "gauge",
                Kind::Counter => "counter",
            },
            samples: String::new(),
        });
        f.samples.push_str(name);
        if !labels.is_empty() {
            f.samples.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    f.samples.push(',');
                }
                let _ = write!(f.samples, "{k}=\"{}\"", escape(v));
            }
            f.samples.push('}');
        }
        let _ = writeln!(f.samples, " {value}");
    }

    /// The text format (`text/plain; version=0.0.4`).
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, f) in &self.families {
            let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} {}", f.help, f.kind);
            out.push_str(&f.samples);
        }
        out
    }

    /// This process's CPU time, memory and open files, under the names
    /// Prometheus client libraries use (Linux; nothing elsewhere).
    pub fn process(&mut self) {
        // utime and stime, fields 14 and 15, in clock ticks (USER_HZ, 100
        // on every Linux ABI), after the command name in parentheses.
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map(|(_, rest)| rest.split_whitespace().collect())
                .unwrap_or_default();
            let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
            if let (Some(u), Some(s)) = (tick(11), tick(12)) {
                self.sample(
                    "process_cpu_seconds_total",
                    Kind::Counter,
                    "User and system CPU time spent, in seconds.",
                    &[],
                    (u + s) as f64 / 100.0,
                );
            }
        }
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            let rss = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
            if let Some(kb) = rss {
                self.sample(
                    "process_resident_memory_bytes",
                    Kind::Gauge,
                    "Resident memory size in bytes.",
                    &[],
                    kb * 1024,
                );
            }
        }
        for (outcome, reason, n) in crate::oidc::decisions() {
            if n > 0 || outcome == "accepted" {
                self.sample(
                    "flotilla_token_auth_total",
                    Kind::Counter,
                    "OIDC token logins decided by this process, by outcome and reason.",
                    &[("outcome", outcome), ("reason", reason)],
                    n,
                );
            }
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            self.sample(
                "process_open_fds",
                Kind::Gauge,
                "Open file descriptors.",
                &[],
                fds.count(),
            );
        }
    }

    /// The series of one component's report (`component` is `router`,
    /// `broker`, `gateway` or `lwt`; `id` its id).
    pub fn report(&mut self, component: &str, id: &str, r: &Value) {
        match component {
            "router" => self.router(id, r),
            "broker" => self.broker(id, r),
            "gateway" => self.gateway(id, r),
            "lwt" => self.lwt(id, r),
            _ => {}
        }
    }

    fn router(&mut self, router: &str, r: &Value) {
        let mut per_space: BTreeMap<&str, u64> = BTreeMap::new();
        let connections = r["connections"].as_array().map_or(&[][..], |v| v);
        for c in connections {
            *per_space
                .entry(c["space"].as_str().unwrap_or(""))
                .or_default() += 1;
        }
        for (space, n) in per_space {
            self.sample(
                "flotilla_router_connections",
                Kind::Gauge,
                "Client connections per router and address space.",
                &[("router", router), ("space", space)],
                n,
            );
        }
        let labels = [("router", router)];
        self.sample(
            "flotilla_router_client_connections",
            Kind::Gauge,
            "Client connections on a router, every address space together.",
            &labels,
            connections.len(),
        );
        let links = r["links"].as_array().map_or(&[][..], |v| v);
        self.sample(
            "flotilla_router_links",
            Kind::Gauge,
            "Client links attached to a router's addresses.",
            &labels,
            links.len(),
        );
        let unsettled: u64 = links.iter().map(|l| n(&l["unsettled"])).sum();
        self.sample(
            "flotilla_router_unsettled",
            Kind::Gauge,
            "Deliveries a router sent its receivers that they have not settled.",
            &labels,
            unsettled,
        );
        self.sample(
            "flotilla_router_neighbours",
            Kind::Gauge,
            "Routers this router exchanges traffic with (mesh neighbours).",
            &labels,
            n(&r["neighbours"]),
        );
        let mut delivered = 0;
        for a in r["addresses"].as_array().into_iter().flatten() {
            let space = a["space"].as_str().unwrap_or("");
            let address = a["address"].as_str().unwrap_or("");
            let l = [("router", router), ("space", space), ("address", address)];
            delivered += n(&a["delivered"]);
            self.sample(
                "flotilla_address_delivered_total",
                Kind::Counter,
                "Messages routers delivered per address.",
                &l,
                n(&a["delivered"]),
            );
            self.sample(
                "flotilla_address_senders",
                Kind::Gauge,
                "Senders attached per address.",
                &l,
                n(&a["senders"]),
            );
            self.sample(
                "flotilla_address_receivers",
                Kind::Gauge,
                "Receivers attached per address.",
                &l,
                n(&a["receivers"]),
            );
        }
        self.sample(
            "flotilla_router_delivered_total",
            Kind::Counter,
            "Messages a router delivered to its receivers and neighbours, all addresses.",
            &labels,
            delivered,
        );
    }

    fn broker(&mut self, broker: &str, r: &Value) {
        for q in r["queues"].as_array().into_iter().flatten() {
            let space = q["space"].as_str().unwrap_or("");
            let queue = q["address"].as_str().unwrap_or("");
            let l = [("broker", broker), ("space", space), ("queue", queue)];
            self.sample(
                "flotilla_queue_depth",
                Kind::Gauge,
                "Messages a broker holds per queue or subscription.",
                &l,
                n(&q["depth"]),
            );
            for (name, key, help) in [
                (
                    "flotilla_queue_acknowledged_total",
                    "acknowledged",
                    "Messages consumers acknowledged.",
                ),
                (
                    "flotilla_queue_expired_total",
                    "expired",
                    "Messages whose time to live ran out.",
                ),
                (
                    "flotilla_queue_dead_lettered_total",
                    "deadLettered",
                    "Messages moved to the dead-letter queue.",
                ),
            ] {
                self.sample(name, Kind::Counter, help, &l, n(&q[key]));
            }
        }
    }

    fn gateway(&mut self, gateway: &str, r: &Value) {
        let mut per: BTreeMap<&str, (u64, u64, u64)> = BTreeMap::new();
        for c in r["sessions"].as_array().into_iter().flatten() {
            let e = per.entry(c["space"].as_str().unwrap_or("")).or_default();
            e.0 += 1;
            e.1 += c["subscriptions"].as_array().map_or(0, |a| a.len() as u64);
            e.2 += n(&c["inflight"]);
        }
        for (space, (conns, subs, inflight)) in per {
            let l = [("gateway", gateway), ("space", space)];
            self.sample(
                "flotilla_mqtt_connections",
                Kind::Gauge,
                "MQTT clients connected per gateway and address space.",
                &l,
                conns,
            );
            self.sample(
                "flotilla_mqtt_subscriptions",
                Kind::Gauge,
                "MQTT subscriptions per gateway and address space.",
                &l,
                subs,
            );
            self.sample(
                "flotilla_mqtt_inflight",
                Kind::Gauge,
                "QoS 1 and 2 messages sent to MQTT clients and not yet acknowledged.",
                &l,
                inflight,
            );
        }
        let t = &r["totals"];
        for (name, key, help) in [
            (
                "flotilla_mqtt_received_total",
                "received",
                "PUBLISH packets MQTT clients sent a gateway.",
            ),
            (
                "flotilla_mqtt_sent_total",
                "sent",
                "PUBLISH packets a gateway sent MQTT clients.",
            ),
            (
                "flotilla_mqtt_dropped_total",
                "dropped",
                "QoS 0 messages dropped for slow MQTT clients.",
            ),
            (
                "flotilla_mqtt_connections_total",
                "connections",
                "MQTT connections accepted.",
            ),
            (
                "flotilla_mqtt_refused_connections_total",
                "refusedConnections",
                "MQTT connections refused.",
            ),
            (
                "flotilla_mqtt_protocol_errors_total",
                "protocolErrors",
                "MQTT connections closed for a protocol error.",
            ),
        ] {
            self.sample(
                name,
                Kind::Counter,
                help,
                &[("gateway", gateway)],
                n(&t[key]),
            );
        }
    }

    fn lwt(&mut self, service: &str, r: &Value) {
        for (space, c) in r["spaces"].as_object().into_iter().flatten() {
            let l = [("service", service), ("space", space.as_str())];
            self.sample(
                "flotilla_lwt_wills",
                Kind::Gauge,
                "Wills the last-will service holds per address space.",
                &l,
                n(&c["held"]),
            );
            self.sample(
                "flotilla_lwt_registered_total",
                Kind::Counter,
                "Wills registered.",
                &l,
                n(&c["registered"]),
            );
            self.sample(
                "flotilla_lwt_cancelled_total",
                Kind::Counter,
                "Wills deleted by a graceful disconnect or a reconnect in time.",
                &l,
                n(&c["cancelled"]),
            );
            for (cause, key) in [
                ("connection_lost", "connectionLost"),
                ("gateway_lost", "gatewayLost"),
                ("asked", "asked"),
            ] {
                self.sample(
                    "flotilla_lwt_fired_total",
                    Kind::Counter,
                    "Wills published, by cause.",
                    &[l[0], l[1], ("cause", cause)],
                    n(&c["fired"][key]),
                );
            }
            self.sample(
                "flotilla_lwt_orphans_dropped_total",
                Kind::Counter,
                "AMQP wills dropped after their link broke between routers.",
                &l,
                n(&c["droppedOrphans"]),
            );
        }
    }
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn families_group_and_labels_escape() {
        let mut e = Exposition::default();
        let r = json!({
            "connections": [{"space": "a"}, {"space": "b\"x"}, {"space": "a"}],
            "links": [{"unsettled": 3}, {"unsettled": 4}],
            "neighbours": 2,
            "addresses": [
                {"space": "a", "address": "q1", "delivered": 5, "senders": 1, "receivers": 1},
                {"space": "a", "address": "q2", "delivered": 7, "senders": 0, "receivers": 2},
            ],
        });
        e.report("router", "r0", &r);
        e.report("router", "r1", &json!({"connections": []}));
        let text = e.render();
        assert_eq!(
            text.matches("# TYPE flotilla_router_links gauge").count(),
            1
        );
        assert!(text.contains("flotilla_router_connections{router=\"r0\",space=\"a\"} 2\n"));
        assert!(text.contains("space=\"b\\\"x\"} 1\n"));
        assert!(text.contains("flotilla_router_unsettled{router=\"r0\"} 7\n"));
        assert!(text.contains("flotilla_router_delivered_total{router=\"r0\"} 12\n"));
        assert!(text.contains("flotilla_router_client_connections{router=\"r1\"} 0\n"));
        // Each family's samples follow its own TYPE line.
        let links = text.find("# TYPE flotilla_router_links").unwrap();
        let r1 = text.find("flotilla_router_links{router=\"r1\"}").unwrap();
        let next = text[links + 1..]
            .find("# HELP")
            .map_or(text.len(), |i| i + links + 1);
        assert!(r1 > links && r1 < next);
    }
}
