//! The address list's index: per address space, one small row per
//! Address (what the list filters and sorts by), kept change by change
//! from the store's stream. A list page is a filter and an ordering over
//! these rows, and then the page's own objects read from the store: no
//! scan of the store, and no copy of it, per request or per change.
//!
//! An ordering other than by name is made once and kept (a few per space)
//! until the space's addresses change, so paging through it costs the
//! page. Live columns (rates, depths) are ordered by what the routers and
//! brokers last reported, fresh for each request.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use serde_json::Value;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;

use crate::store::{Change, Store, StoreError};

/// What the list shows of an address (and sorts by).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub name: String,
    pub address: String,
    pub kind: String,
    pub broker: String,
    pub phase: String,
    pub created: String,
}

impl Row {
    fn of(v: &Value) -> Row {
        let s = |v: &Value| v.as_str().unwrap_or("").to_string();
        Row {
            name: s(&v["metadata"]["name"]),
            address: s(&v["spec"]["address"]),
            kind: s(&v["spec"]["type"]),
            broker: v["spec"]["broker"]
                .as_str()
                .or(v["status"]["broker"].as_str())
                .unwrap_or("")
                .to_string(),
            phase: s(&v["status"]["phase"]),
            created: s(&v["metadata"]["creationTimestamp"]),
        }
    }

    /// The value of a stored column.
    fn column(&self, c: Column) -> &str {
        match c {
            Column::Name => &self.name,
            Column::Address => &self.address,
            Column::Type => &self.kind,
            Column::Broker => &self.broker,
            Column::Phase => &self.phase,
            Column::Created => &self.created,
            _ => "",
        }
    }
}

/// What a list can be ordered by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Column {
    Name,
    Address,
    Type,
    Broker,
    Phase,
    Created,
    /// Live: what the routers and brokers report.
    Senders,
    Receivers,
    Delivered,
    Rate,
    Stored,
}

impl Column {
    /// The column `s` names (as the API and the web console spell it).
    pub fn parse(s: &str) -> Option<Column> {
        Some(match s {
            "name" => Column::Name,
            "address" => Column::Address,
            "type" => Column::Type,
            "broker" => Column::Broker,
            "phase" => Column::Phase,
            "created" => Column::Created,
            "senders" => Column::Senders,
            "receivers" => Column::Receivers,
            "delivered" => Column::Delivered,
            "rate" => Column::Rate,
            "stored" => Column::Stored,
            _ => return None,
        })
    }

    /// The live metric's field, for a live column.
    pub fn live(self) -> Option<&'static str> {
        Some(match self {
            Column::Senders => "senders",
            Column::Receivers => "receivers",
            Column::Delivered => "delivered",
            Column::Rate => "rate",
            Column::Stored => "stored",
            _ => return None,
        })
    }
}

/// The orderings kept per space (the most recently made).
const KEPT_ORDERS: usize = 8;

/// An ordering: (column, descending, filter), when it was made, and the
/// names in order.
type Order = ((Column, bool, String), std::time::Instant, Arc<Vec<String>>);

/// How long an ordering by a live column is kept (the reports it orders
/// by come once a second).
const LIVE_ORDER: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Default)]
struct SpaceRows {
    rows: BTreeMap<String, Row>,
    /// Orderings made since the rows last changed (a live one for a
    /// second).
    orders: Vec<Order>,
}

#[derive(Default)]
struct Rows {
    spaces: HashMap<String, SpaceRows>,
    /// The store's resource version when they were loaded (changes up to
    /// it are in them already).
    loaded: u64,
}

/// The index; cheap to clone.
#[derive(Clone)]
pub struct Index {
    rows: Arc<RwLock<Rows>>,
    /// The store's resource version the index has applied.
    seen: watch::Sender<u64>,
    /// Serializes the orderings' making (one sort at a time).
    sorting: Arc<Mutex<()>>,
    /// It fell behind the store's changes: load it again before use.
    stale: Arc<std::sync::atomic::AtomicBool>,
}

/// What page of a list is asked for: the addresses whose name or address
/// contains `filter`, ordered by `by` (`live`: each address's live
/// numbers, for a live column), starting after `cont`, at most `limit`.
#[derive(Clone, Copy)]
pub struct Ask<'a> {
    pub filter: &'a str,
    pub by: Column,
    pub descending: bool,
    pub live: Option<&'a HashMap<String, f64>>,
    pub cont: Option<&'a str>,
    pub limit: usize,
}

/// One page of a list.
pub struct Page {
    /// The names on the page, in order.
    pub names: Vec<String>,
    /// How many match the filter in all.
    pub total: usize,
    /// Where the next page starts, if there is one.
    pub next: Option<String>,
}

impl Index {
    /// Loads every Address of `store` and follows its changes from then
    /// on (in a task, until the store's stream ends).
    pub fn start(store: &Store) -> Result<Index, StoreError> {
        let index = Index {
            rows: Arc::default(),
            seen: watch::Sender::new(0),
            sorting: Arc::default(),
            stale: Arc::default(),
        };
        let mut changes = store.subscribe();
        index.load(store)?;
        let i = index.clone();
        tokio::spawn(async move {
            loop {
                match changes.recv().await {
                    Ok(c) => i.apply(&c),
                    // Fell behind a burst: read again when next used.
                    Err(RecvError::Lagged(_)) => {
                        i.stale.store(true, std::sync::atomic::Ordering::Relaxed);
                        i.seen.send_modify(|s| *s = u64::MAX);
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
        Ok(index)
    }

    /// Loads the index again if it fell behind the store's changes.
    ///
    /// # Errors
    /// The store cannot be read.
    pub fn refresh(&self, store: &Store) -> Result<(), StoreError> {
        if self.stale.swap(false, std::sync::atomic::Ordering::Relaxed) {
            self.load(store)?;
        }
        Ok(())
    }

    fn load(&self, store: &Store) -> Result<(), StoreError> {
        let (rv, items) = store.list("Address/", None, usize::MAX)?;
        let mut rows = Rows {
            loaded: rv,
            ..Rows::default()
        };
        for (_, v) in items {
            let space = v["spec"]["addressSpace"].as_str().unwrap_or("").to_string();
            let r = Row::of(&v);
            rows.spaces
                .entry(space)
                .or_default()
                .rows
                .insert(r.name.clone(), r);
        }
        *self.rows.write().unwrap_or_else(|p| p.into_inner()) = rows;
        self.seen
            .send_modify(|s| *s = if *s == u64::MAX { rv } else { (*s).max(rv) });
        Ok(())
    }

    /// Applies one change of the store.
    fn apply(&self, c: &Change) {
        if c.object["kind"] == "Address" {
            let space = c.object["spec"]["addressSpace"].as_str().unwrap_or("");
            let name = c.object["metadata"]["name"].as_str().unwrap_or("");
            let mut rows = self.rows.write().unwrap_or_else(|p| p.into_inner());
            if c.rv <= rows.loaded {
                return;
            }
            let s = rows.spaces.entry(space.to_string()).or_default();
            s.orders.clear();
            if c.kind == "DELETED" {
                s.rows.remove(name);
            } else {
                s.rows.insert(name.to_string(), Row::of(&c.object));
            }
        }
        self.seen.send_modify(|s| *s = (*s).max(c.rv));
    }

    /// Waits (at most a second) until the index has applied the store's
    /// resource version `rv`: a list right after a write shows it.
    pub async fn caught_up(&self, rv: u64) {
        let mut w = self.seen.subscribe();
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(1), w.wait_for(|s| *s >= rv)).await;
    }

    /// A page of space `space`'s addresses, as `ask` says.
    pub fn page(&self, space: &str, ask: &Ask<'_>) -> Page {
        let Ask {
            filter,
            by,
            descending,
            live,
            cont,
            limit,
        } = *ask;
        let matches =
            |r: &Row| filter.is_empty() || r.name.contains(filter) || r.address.contains(filter);
        let rows = self.rows.read().unwrap_or_else(|p| p.into_inner());
        let Some(s) = rows.spaces.get(space) else {
            return Page {
                names: Vec::new(),
                total: 0,
                next: None,
            };
        };
        if by == Column::Name && !descending && filter.is_empty() {
            // The rows' own order: from the name after `cont`, a range.
            let total = s.rows.len();
            let from = cont.unwrap_or("");
            let mut names: Vec<String> = s
                .rows
                .range::<str, _>((std::ops::Bound::Excluded(from), std::ops::Bound::Unbounded))
                .map(|(_, r)| r)
                .filter(|r| matches(r))
                .take(limit.saturating_add(1))
                .map(|r| r.name.clone())
                .collect();
            let next = (names.len() > limit).then(|| {
                names.truncate(limit);
                names.last().cloned().unwrap_or_default()
            });
            return Page { names, total, next };
        }
        // Another order (or a filter): made once, then paged by position
        // (`@N`); one by a live column is made again after a second.
        let key = (by, descending, filter.to_string());
        let fresh = |at: &std::time::Instant| by.live().is_none() || at.elapsed() < LIVE_ORDER;
        let kept = s
            .orders
            .iter()
            .find(|(k, at, _)| *k == key && fresh(at))
            .map(|(_, _, o)| o.clone());
        let order = match kept {
            Some(o) => o,
            None => {
                let _one = self.sorting.lock().unwrap_or_else(|p| p.into_inner());
                // The rows come in name order, and the sorts are stable:
                // ties stay in name order, either way.
                let mut picked: Vec<&Row> = s.rows.values().filter(|r| matches(r)).collect();
                let way = |o: std::cmp::Ordering| if descending { o.reverse() } else { o };
                match live {
                    Some(l) if by.live().is_some() => {
                        let mut keyed: Vec<(f64, &Row)> = picked
                            .into_iter()
                            .map(|r| (l.get(&r.address).copied().unwrap_or(0.0), r))
                            .collect();
                        keyed.sort_by(|a, b| way(a.0.total_cmp(&b.0)));
                        picked = keyed.into_iter().map(|(_, r)| r).collect();
                    }
                    _ if by == Column::Name => {
                        if descending {
                            picked.reverse();
                        }
                    }
                    _ => picked.sort_by(|a, b| way(a.column(by).cmp(b.column(by)))),
                }
                let o = Arc::new(
                    picked
                        .into_iter()
                        .map(|r| r.name.clone())
                        .collect::<Vec<_>>(),
                );
                drop(rows);
                let mut rows = self.rows.write().unwrap_or_else(|p| p.into_inner());
                if let Some(s) = rows.spaces.get_mut(space) {
                    s.orders.retain(|(k, _, _)| *k != key);
                    s.orders
                        .insert(0, (key, std::time::Instant::now(), o.clone()));
                    s.orders.truncate(KEPT_ORDERS);
                }
                o
            }
        };
        let start = cont
            .and_then(|c| c.strip_prefix('@'))
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0)
            .min(order.len());
        let end = start.saturating_add(limit).min(order.len());
        Page {
            names: order[start..end].to_vec(),
            total: order.len(),
            next: (end < order.len()).then(|| format!("@{end}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first page of two by name; fields over it.
    fn ask() -> Ask<'static> {
        Ask {
            filter: "",
            by: Column::Name,
            descending: false,
            live: None,
            cont: None,
            limit: 2,
        }
    }

    fn index_of(n: usize) -> Index {
        let i = Index {
            rows: Arc::default(),
            seen: watch::Sender::new(0),
            sorting: Arc::default(),
            stale: Arc::default(),
        };
        for k in 0..n {
            i.apply(&Change {
                rv: k as u64 + 1,
                kind: "ADDED",
                object: serde_json::json!({
                    "kind": "Address",
                    "metadata": {"name": format!("a{k:03}")},
                    "spec": {"addressSpace": "s", "address": format!("x{}", n - k), "type": if k % 2 == 0 { "queue" } else { "anycast" }},
                }),
            });
        }
        i
    }

    #[test]
    fn pages_by_name_by_another_column_and_by_a_live_one() {
        let i = index_of(5);
        let p = i.page("s", &Ask { limit: 2, ..ask() });
        assert_eq!(
            (p.names.clone(), p.total, p.next.clone()),
            (vec!["a000".into(), "a001".into()], 5, Some("a001".into()))
        );
        let p = i.page(
            "s",
            &Ask {
                cont: p.next.as_deref(),
                limit: 2,
                ..ask()
            },
        );
        assert_eq!(p.names, vec!["a002", "a003"]);
        // By type, then name; paged by position.
        let p = i.page(
            "s",
            &Ask {
                by: Column::Type,
                limit: 3,
                ..ask()
            },
        );
        assert_eq!(p.names, vec!["a001", "a003", "a000"]);
        assert_eq!(p.next.as_deref(), Some("@3"));
        let p = i.page(
            "s",
            &Ask {
                by: Column::Type,
                cont: Some("@3"),
                limit: 3,
                ..ask()
            },
        );
        assert_eq!(
            (p.names, p.next),
            (vec!["a002".to_string(), "a004".into()], None)
        );
        // Descending by address.
        let p = i.page(
            "s",
            &Ask {
                by: Column::Address,
                descending: true,
                limit: 2,
                ..ask()
            },
        );
        assert_eq!(p.names, vec!["a000", "a001"]);
        // A filter, and a live column.
        let p = i.page(
            "s",
            &Ask {
                filter: "x3",
                limit: 10,
                ..ask()
            },
        );
        assert_eq!((p.names, p.total), (vec!["a002".to_string()], 1));
        let live: HashMap<String, f64> = [("x1".to_string(), 9.0), ("x5".to_string(), 3.0)].into();
        let p = i.page(
            "s",
            &Ask {
                by: Column::Rate,
                descending: true,
                live: Some(&live),
                limit: 2,
                ..ask()
            },
        );
        assert_eq!(p.names, vec!["a004", "a000"]);
        // A change drops the kept orderings.
        i.apply(&Change {
            rv: 99,
            kind: "DELETED",
            object: serde_json::json!({"kind": "Address", "metadata": {"name": "a001"}, "spec": {"addressSpace": "s"}}),
        });
        let p = i.page(
            "s",
            &Ask {
                by: Column::Type,
                limit: 3,
                ..ask()
            },
        );
        assert_eq!(p.names, vec!["a003", "a000", "a002"]);
        assert_eq!(
            i.page(
                "t",
                &Ask {
                    filter: "",
                    by: Column::Name,
                    descending: false,
                    live: None,
                    cont: None,
                    limit: 3
                }
            )
            .total,
            0
        );
    }
}
