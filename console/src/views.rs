//! What the web console's pages show beyond the resources: the overview
//! (totals, the rings of [`crate::history`], the busiest addresses, the
//! components that are down), the map of the mesh, an address's history,
//! and a space's quotas beside what it uses. All of it is read from the
//! components' last reports, the history rings and the store's counts:
//! nothing here scans the addresses.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Value};

use crate::api::{blocking, require_space, ApiResult, AppState, Kind};

/// A router that has not reported for this long is drawn as down: it
/// reports every second, and its neighbours declare it dead after 3 s
/// without a HELLO (the map must say so no later than they do).
pub const ROUTER_GONE: Duration = Duration::from_millis(2500);
/// Components that stopped reporting stay on the map (as down) this long.
pub const FORGET: Duration = Duration::from_secs(600);

/// `GET /api/v1/overview`.
pub async fn overview(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let store = state.store.clone();
    let (spaces, addresses) = blocking(move || {
        // `default` exists without a resource.
        let named = store.count("AddressSpace/")?;
        let default_named = store.get(&Kind::AddressSpace.key("", "default"))?.is_some();
        Ok((
            named + usize::from(!default_named),
            store.count("Address/")?,
        ))
    })
    .await?;
    let (connections, senders, receivers, components) = {
        let live = state.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut connections = 0;
        let (mut senders, mut receivers) = (0, 0);
        for (_, r) in live.fresh("router") {
            connections += r["connections"].as_array().map_or(0, Vec::len);
            for a in r["addresses"].as_array().into_iter().flatten() {
                senders += a["senders"].as_u64().unwrap_or(0);
                receivers += a["receivers"].as_u64().unwrap_or(0);
            }
            for l in r["links"].as_array().into_iter().flatten() {
                if l["routed"] == true {
                    if l["dir"] == "in" {
                        senders += 1;
                    } else {
                        receivers += 1;
                    }
                }
            }
        }
        for (_, r) in live.fresh("gateway") {
            connections += r["sessions"].as_array().map_or(0, Vec::len);
        }
        (connections, senders, receivers, components(&live))
    };
    let h = state.history.lock().unwrap_or_else(|p| p.into_inner());
    let busiest: Vec<Value> = h
        .busiest
        .iter()
        .map(|(space, address, s)| {
            json!({"space": space, "address": address, "in": s.r#in, "out": s.out, "stored": s.stored})
        })
        .collect();
    Ok(Json(json!({
        "totals": {
            "addressSpaces": spaces,
            "addresses": addresses,
            "connections": connections,
            "senders": senders,
            "receivers": receivers,
        },
        "seconds": h.seconds,
        "minutes": h.minutes,
        "busiest": busiest,
        "components": components,
    })))
}

/// Every component that reported in the last [`FORGET`]: its kind, id,
/// state (`up`, `down`, or `notReady` for a broker the console placed
/// nothing on yet… as its report says) and age of its last report.
fn components(live: &crate::api::Live) -> Vec<Value> {
    live.all()
        .filter(|(_, at, _)| at.elapsed() < FORGET)
        .map(|(id, at, r)| {
            json!({
                "id": id,
                "kind": r["component"],
                "name": r["id"],
                "state": state(at, r),
                "lastReportMs": at.elapsed().as_millis() as u64,
            })
        })
        .collect()
}

/// A component's state from its last report (made at `at`).
fn state(at: std::time::Instant, r: &Value) -> &'static str {
    let gone = if r["component"] == "router" {
        ROUTER_GONE
    } else {
        crate::api::FRESH
    };
    if at.elapsed() >= gone {
        "down"
    } else if r["ready"] == false {
        "notReady"
    } else {
        "up"
    }
}

/// `GET /api/v1/mesh`: the routers, brokers, gateways and last-will
/// services as nodes with their health and load, and the links between
/// them: routers' neighbours (as each reports them, from its link state),
/// and which router each broker, gateway and last-will service is on.
pub async fn mesh(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let live = state.live.lock().unwrap_or_else(|p| p.into_inner());
    let mut nodes = Vec::new();
    let mut edges = BTreeSet::new();
    // A router's mesh id → its node id.
    let mut by_router_id = BTreeMap::new();
    let recent: Vec<(&String, std::time::Instant, &Value)> = live
        .all()
        .filter(|(_, at, _)| at.elapsed() < FORGET)
        .collect();
    for (id, _, r) in &recent {
        if r["component"] == "router" {
            if let Some(rid) = r["routerId"].as_str() {
                by_router_id.insert(rid.to_string(), (*id).clone());
            }
        }
    }
    for c in components(&live) {
        let id = c["id"].as_str().unwrap_or("").to_string();
        let Some((_, _, r)) = recent.iter().find(|(k, _, _)| **k == id) else {
            continue;
        };
        let up = c["state"] != "down";
        let mut node = c.clone();
        match r["component"].as_str() {
            Some("router") => {
                node["edge"] = r["edge"].clone();
                node["routerId"] = r["routerId"].clone();
                node["connections"] = r["connections"].as_array().map_or(0, Vec::len).into();
                node["rate"] = r["addresses"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| a["rate"].as_u64().unwrap_or(0))
                    .sum::<u64>()
                    .into();
                if up {
                    for p in r["peers"].as_array().into_iter().flatten() {
                        if let Some(other) = p.as_str().and_then(|p| by_router_id.get(p)) {
                            let (a, b) = if id < *other {
                                (id.clone(), other.clone())
                            } else {
                                (other.clone(), id.clone())
                            };
                            edges.insert((a, b));
                        }
                    }
                    for b in r["containers"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                    {
                        let to = if b == "$lwt" {
                            recent
                                .iter()
                                .find(|(_, _, r)| r["component"] == "lwt")
                                .map(|(k, _, _)| (*k).clone())
                        } else {
                            Some(format!("broker/{b}"))
                        };
                        if let Some(to) = to {
                            edges.insert((id.clone(), to));
                        }
                    }
                    // A gateway's connections are named GATEWAY.N.
                    for g in r["gateways"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                    {
                        let on = recent.iter().find(|(_, _, x)| {
                            x["component"] == "gateway"
                                && x["id"].as_str().is_some_and(|n| {
                                    g == n
                                        || g.strip_prefix(n)
                                            .is_some_and(|rest| rest.starts_with('.'))
                                })
                        });
                        if let Some((gid, _, _)) = on {
                            edges.insert((id.clone(), (*gid).clone()));
                        }
                    }
                }
            }
            Some("broker") => {
                let queues = r["queues"].as_array();
                node["queues"] = queues.map_or(0, Vec::len).into();
                node["stored"] = queues
                    .into_iter()
                    .flatten()
                    .map(|q| q["depth"].as_u64().unwrap_or(0))
                    .sum::<u64>()
                    .into();
                node["rate"] = queues
                    .into_iter()
                    .flatten()
                    .map(|q| q["inRate"].as_u64().unwrap_or(0) + q["outRate"].as_u64().unwrap_or(0))
                    .sum::<u64>()
                    .into();
            }
            Some("gateway") => {
                node["connections"] = r["sessions"].as_array().map_or(0, Vec::len).into();
            }
            Some("lwt") => {
                node["wills"] = r["wills"].clone();
            }
            _ => {}
        }
        nodes.push(node);
    }
    let known: BTreeSet<String> = nodes
        .iter()
        .filter_map(|n| n["id"].as_str().map(String::from))
        .collect();
    let edges: Vec<Value> = edges
        .into_iter()
        .filter(|(a, b)| known.contains(a) && known.contains(b))
        .map(|(a, b)| json!({"from": a, "to": b}))
        .collect();
    Ok(Json(json!({"nodes": nodes, "edges": edges})))
}

/// `GET …/addresses/{name}/history`: the address's last 15 minutes, a
/// sample a second, if it was busy lately (the console keeps the most
/// recently busy [`crate::history::MAX_ADDRESSES`]).
pub async fn address_history(
    State(state): State<AppState>,
    Path((space, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    require_space(&state, &space).await?;
    let store = state.store.clone();
    let key = Kind::Address.key(&space, &name);
    let address = blocking(move || store.get(&key))
        .await?
        .and_then(|a| a["spec"]["address"].as_str().map(String::from))
        .unwrap_or(name);
    let h = state.history.lock().unwrap_or_else(|p| p.into_inner());
    let seconds = h.address(&space, &address);
    Ok(Json(json!({
        "address": address,
        "kept": seconds.is_some(),
        "seconds": seconds.map(|s| s.iter().collect::<Vec<_>>()).unwrap_or_default(),
    })))
}

/// `GET /api/v1/addressspaces/{space}/usage`: the space's plan, its
/// quotas, and how much of each it uses.
pub async fn usage(
    State(state): State<AppState>,
    Path(space): Path<String>,
) -> ApiResult<Json<Value>> {
    require_space(&state, &space).await?;
    let store = state.store.clone();
    let sp = space.clone();
    let (object, addresses, users) = blocking(move || {
        Ok((
            store.get(&Kind::AddressSpace.key("", &sp))?,
            store.count(&Kind::Address.prefix(&sp))?,
            store.count(&Kind::MessagingUser.prefix(&sp))?,
        ))
    })
    .await?;
    let parsed = object.as_ref().and_then(|o| {
        serde_json::from_value::<flotilla_core::resources::AddressSpace>(o.clone()).ok()
    });
    let plan = parsed.as_ref().and_then(|s| s.spec.plan.clone());
    let quotas = parsed.and_then(|s| s.quotas().ok()).unwrap_or_default();
    let (mut connections, mut links, mut stored_bytes) = (0u64, 0u64, 0u64);
    {
        let live = state.live.lock().unwrap_or_else(|p| p.into_inner());
        let of_space = |list: &Value| {
            list.as_array()
                .into_iter()
                .flatten()
                .filter(|c| c["space"] == space.as_str())
                .count() as u64
        };
        for (_, r) in live.fresh("router") {
            connections += of_space(&r["connections"]);
            links += r["spaceLinks"][space.as_str()].as_u64().unwrap_or(0);
        }
        for (_, r) in live.fresh("gateway") {
            connections += of_space(&r["sessions"]);
        }
        for (_, r) in live.fresh("broker") {
            stored_bytes += r["queues"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|q| q["space"] == space.as_str())
                .map(|q| q["bytes"].as_u64().unwrap_or(0))
                .sum::<u64>();
        }
    }
    let item = |used: u64, limit: Option<u64>| json!({"used": used, "limit": limit});
    Ok(Json(json!({
        "space": space,
        "plan": plan,
        "quotas": {
            "addresses": item(addresses as u64, quotas.addresses),
            "connections": item(connections, quotas.connections),
            "links": item(links, quotas.links),
            "storedBytes": item(stored_bytes, quotas.stored_bytes),
            "messageSize": {"limit": quotas.message_size},
        },
        "users": users,
    })))
}

/// What a component page lists at most of each kind.
const LISTED: usize = 500;

/// `GET /api/v1/components/{kind}/{name}`: one component from its last
/// report: its state, a few facts, and (at most 500 each) its client
/// connections and its addresses or queues.
pub async fn component(
    State(state): State<AppState>,
    Path((kind, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let id = format!("{kind}/{name}");
    let live = state.live.lock().unwrap_or_else(|p| p.into_inner());
    let Some((_, at, r)) = live
        .all()
        .find(|(k, at, _)| **k == id && at.elapsed() < FORGET)
    else {
        return Err(crate::api::ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "NotFound",
            format!("no component {id:?} has reported"),
        ));
    };
    let list = |k: &str| r[k].as_array().map_or(0, Vec::len);
    let mut facts = serde_json::Map::new();
    let mut connections = Vec::new();
    let mut addresses = Vec::new();
    match kind.as_str() {
        "router" => {
            facts.insert("Mesh id".into(), r["routerId"].clone());
            facts.insert(
                "Mode".into(),
                if r["edge"] == true {
                    "edge"
                } else {
                    "interior"
                }
                .into(),
            );
            facts.insert("Neighbours".into(), r["peers"].clone());
            facts.insert("Brokers and services on it".into(), r["containers"].clone());
            facts.insert("Client connections".into(), list("connections").into());
            for c in r["connections"]
                .as_array()
                .into_iter()
                .flatten()
                .take(LISTED)
            {
                let mut c = c.clone();
                c["router"] = name.clone().into();
                connections.push(c);
            }
            addresses.extend(
                r["addresses"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .take(LISTED)
                    .cloned(),
            );
        }
        "broker" => {
            facts.insert("Queues and subscriptions".into(), list("queues").into());
            for q in r["queues"].as_array().into_iter().flatten().take(LISTED) {
                addresses.push(json!({
                    "space": q["space"], "address": q["address"], "senders": 0,
                    "receivers": q["consumers"], "rate": q["outRate"], "stored": q["depth"],
                }));
            }
        }
        "gateway" => {
            facts.insert("MQTT sessions".into(), list("sessions").into());
            for s in r["sessions"].as_array().into_iter().flatten().take(LISTED) {
                let mut s = s.clone();
                s["router"] = name.clone().into();
                s["container"] = s["clientId"].clone();
                connections.push(s);
            }
        }
        "lwt" => {
            facts.insert("Wills held".into(), r["wills"].clone());
        }
        _ => {}
    }
    let facts: serde_json::Map<String, Value> = facts
        .into_iter()
        .map(|(k, v)| {
            let text = match v {
                Value::String(s) => s,
                Value::Array(a) if a.is_empty() => "none".to_string(),
                Value::Array(a) => a
                    .iter()
                    .map(|x| x.as_str().map_or(x.to_string(), String::from))
                    .collect::<Vec<_>>()
                    .join(", "),
                other => other.to_string(),
            };
            (k, Value::String(text))
        })
        .collect();
    Ok(Json(json!({
        "id": id,
        "kind": kind,
        "name": name,
        "state": self::state(at, r),
        "facts": facts,
        "connections": connections,
        "addresses": addresses,
    })))
}
