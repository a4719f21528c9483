//! History without a database: once a second the console sums what the
//! routers and brokers last reported into a sample, and keeps the samples
//! in bounded rings: a second's for 15 minutes, a minute's for a day. The
//! busiest addresses have a ring of their own (at most [`MAX_ADDRESSES`],
//! those busy most recently). The overview's and an address page's charts
//! read them; `/metrics` carries the same numbers for a Prometheus.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::api::AppState;

/// Per-second samples kept (15 minutes).
pub const SECONDS: usize = 900;
/// Per-minute samples kept (a day).
pub const MINUTES: usize = 1440;
/// Addresses with a history of their own.
pub const MAX_ADDRESSES: usize = 1000;

/// The whole system in one second.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Sample {
    /// Unix time, seconds.
    pub t: u64,
    /// Messages in (taken from producers) and out (delivered), per second.
    #[serde(rename = "in")]
    pub r#in: f64,
    pub out: f64,
    /// Messages stored in brokers.
    pub stored: f64,
    pub connections: f64,
}

/// One address in one second.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct AddressSample {
    pub t: u64,
    #[serde(rename = "in")]
    pub r#in: f64,
    pub out: f64,
    pub stored: f64,
}

/// The rings.
#[derive(Default)]
pub struct History {
    pub seconds: VecDeque<Sample>,
    pub minutes: VecDeque<Sample>,
    /// (space, address) → its seconds, and when it was last busy.
    addresses: HashMap<(String, String), (u64, VecDeque<AddressSample>)>,
    /// The last second's busiest addresses, busiest first.
    pub busiest: Vec<(String, String, AddressSample)>,
}

fn push<T>(ring: &mut VecDeque<T>, cap: usize, v: T) {
    if ring.len() == cap {
        ring.pop_front();
    }
    ring.push_back(v);
}

impl History {
    /// Records one second: the totals, and each address's numbers
    /// (`(space, address)` → in, out, stored).
    pub fn record(&mut self, total: Sample, by_address: HashMap<(String, String), AddressSample>) {
        push(&mut self.seconds, SECONDS, total);
        if total.t % 60 == 59 || self.minutes.is_empty() {
            let last: Vec<&Sample> = self.seconds.iter().rev().take(60).collect();
            let n = last.len().max(1) as f64;
            let avg = |f: fn(&Sample) -> f64| last.iter().map(|s| f(s)).sum::<f64>() / n;
            let minute = Sample {
                t: total.t - total.t % 60,
                r#in: avg(|s| s.r#in),
                out: avg(|s| s.out),
                stored: avg(|s| s.stored),
                connections: avg(|s| s.connections),
            };
            if self.minutes.back().is_some_and(|m| m.t == minute.t) {
                self.minutes.pop_back();
            }
            push(&mut self.minutes, MINUTES, minute);
        }
        let mut busiest: Vec<(String, String, AddressSample)> = Vec::new();
        for ((space, address), s) in by_address {
            let busy = s.r#in > 0.0 || s.out > 0.0 || s.stored > 0.0;
            let key = (space, address);
            if busy {
                busiest.push((key.0.clone(), key.1.clone(), s));
            }
            match self.addresses.get_mut(&key) {
                Some((last, ring)) => {
                    if busy {
                        *last = s.t;
                    }
                    push(ring, SECONDS, s);
                }
                None if busy => {
                    let mut ring = VecDeque::new();
                    ring.push_back(s);
                    self.addresses.insert(key, (s.t, ring));
                }
                None => {}
            }
        }
        // Quiet for the whole window: forgotten. Over the bound: the
        // least recently busy go.
        let now = total.t;
        self.addresses
            .retain(|_, (last, _)| now.saturating_sub(*last) < SECONDS as u64);
        if self.addresses.len() > MAX_ADDRESSES {
            let mut by_age: Vec<(u64, (String, String))> = self
                .addresses
                .iter()
                .map(|(k, (last, _))| (*last, k.clone()))
                .collect();
            by_age.sort();
            for (_, k) in by_age
                .into_iter()
                .take(self.addresses.len() - MAX_ADDRESSES)
            {
                self.addresses.remove(&k);
            }
        }
        busiest.sort_by(|a, b| {
            (b.2.out + b.2.r#in)
                .total_cmp(&(a.2.out + a.2.r#in))
                .then_with(|| b.2.stored.total_cmp(&a.2.stored))
        });
        busiest.truncate(10);
        self.busiest = busiest;
    }

    /// An address's seconds, if it has a history.
    pub fn address(&self, space: &str, address: &str) -> Option<&VecDeque<AddressSample>> {
        self.addresses
            .get(&(space.to_string(), address.to_string()))
            .map(|(_, r)| r)
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What the fresh reports add up to this second.
fn sample(state: &AppState) -> (Sample, HashMap<(String, String), AddressSample>) {
    let live = state.live.lock().unwrap_or_else(|p| p.into_inner());
    let t = now();
    let mut total = Sample {
        t,
        ..Sample::default()
    };
    let mut by: HashMap<(String, String), AddressSample> = HashMap::new();
    let num = |v: &Value| v.as_f64().unwrap_or(0.0);
    let key = |v: &Value| {
        (
            v["space"].as_str().unwrap_or("").to_string(),
            v["address"].as_str().unwrap_or("").to_string(),
        )
    };
    for (_, r) in live.fresh("router") {
        total.connections += r["connections"].as_array().map_or(0, Vec::len) as f64;
        // An address the router holds: what it delivers came in there too.
        for a in r["addresses"].as_array().into_iter().flatten() {
            let rate = num(&a["rate"]);
            total.r#in += rate;
            total.out += rate;
            let e = by.entry(key(a)).or_insert(AddressSample {
                t,
                ..Default::default()
            });
            e.r#in += rate;
            e.out += rate;
        }
    }
    for (_, r) in live.fresh("gateway") {
        total.connections += r["sessions"].as_array().map_or(0, Vec::len) as f64;
    }
    for (_, r) in live.fresh("broker") {
        for q in r["queues"].as_array().into_iter().flatten() {
            let (i, o, d) = (num(&q["inRate"]), num(&q["outRate"]), num(&q["depth"]));
            total.r#in += i;
            total.out += o;
            total.stored += d;
            let e = by.entry(key(q)).or_insert(AddressSample {
                t,
                ..Default::default()
            });
            e.r#in += i;
            e.out += o;
            e.stored += d;
        }
    }
    (total, by)
}

/// Samples every second until `stop`.
pub async fn keep(state: AppState, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (total, by) = sample(&state);
        state
            .history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(total, by);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t: u64, out: f64) -> Sample {
        Sample {
            t,
            out,
            ..Sample::default()
        }
    }

    #[test]
    fn rings_are_bounded_and_busy_addresses_kept() {
        let mut h = History::default();
        for t in 0..(SECONDS as u64 + 100) {
            let mut by = HashMap::new();
            by.insert(
                ("s".to_string(), "busy".to_string()),
                AddressSample {
                    t,
                    out: 5.0,
                    ..Default::default()
                },
            );
            by.insert(
                ("s".to_string(), "idle".to_string()),
                AddressSample {
                    t,
                    ..Default::default()
                },
            );
            h.record(s(t, 5.0), by);
        }
        assert_eq!(h.seconds.len(), SECONDS);
        assert_eq!(h.seconds.back().map(|x| x.t), Some(SECONDS as u64 + 99));
        assert_eq!(h.minutes.len(), 16, "a minute a minute");
        assert!(h.minutes.iter().all(|m| m.out == 5.0));
        assert_eq!(h.address("s", "busy").map(VecDeque::len), Some(SECONDS));
        assert!(h.address("s", "idle").is_none());
        assert_eq!(h.busiest.len(), 1);
        // More busy addresses than the bound: the most recent stay.
        for i in 0..(MAX_ADDRESSES + 10) {
            let mut by = HashMap::new();
            let t = 10_000 + i as u64;
            by.insert(
                ("s".to_string(), format!("q{i}")),
                AddressSample {
                    t,
                    stored: 1.0,
                    ..Default::default()
                },
            );
            h.record(s(t, 0.0), by);
        }
        assert!(h.addresses.len() <= MAX_ADDRESSES);
        assert!(h.address("s", &format!("q{}", MAX_ADDRESSES + 9)).is_some());
        assert!(h.address("s", "q0").is_none());
    }
}
