//! Edge routers (`--mode edge`): one uplink to an interior router, with
//! failover to the next, no part in link state, and traffic both ways
//! through the uplink.

mod common;

use common::*;

/// An interior router with an inter-router listener, connecting to `peers`.
async fn interior(id: &str, peers: &[u16]) -> RouterProc {
    let mut args = vec![
        "--inter-router".to_string(),
        "127.0.0.1:0".into(),
        "--router-id".into(),
        id.into(),
    ];
    for p in peers {
        args.extend(["--peer".to_string(), format!("127.0.0.1:{p}")]);
    }
    RouterProc::spawn(args, None).await
}

/// An edge router with `uplinks` (inter-router ports) in order.
async fn edge(id: &str, uplinks: &[u16]) -> RouterProc {
    let mut args = vec![
        "--mode".to_string(),
        "edge".into(),
        "--router-id".into(),
        id.into(),
    ];
    for p in uplinks {
        args.extend(["--peer".to_string(), format!("127.0.0.1:{p}")]);
    }
    RouterProc::spawn(args, None).await
}

fn ir(r: &RouterProc) -> u16 {
    r.inter_router.expect("inter-router listener")
}

/// Waits until `r` has heard `edge` announce itself as an edge router on
/// a working connection (the `neighbour` line after `from` lines).
async fn await_edge(r: &RouterProc, edge: &str, from: usize) {
    let want = format!("router={edge} two_way=true edge=true");
    r.wait_log(&format!("{} to see edge router {edge}", r.name), |log| {
        log.iter()
            .skip(from)
            .any(|l| l.contains(&want))
            .then_some(())
    })
    .await;
}

/// Waits until `r`'s routes include `dest`.
async fn await_route(r: &RouterProc, dest: &str) {
    let want = format!("\"{dest} via ");
    r.wait_log(&format!("{} to route to {dest}", r.name), |log| {
        log.iter()
            .rev()
            .find(|l| l.contains("mesh routes"))
            .filter(|l| l.contains(&want))
            .map(|_| ())
    })
    .await;
}

/// Sends one message from `from` to a receiver on `to` and checks it arrives
/// accepted.
async fn one_message(from: &RouterProc, to: &RouterProc, address: &str, body: &str) {
    let mut rx = to.client().await;
    let (rl, _) = rx.open_receiver(Some(address), 10).await.expect("receiver");
    rx.flush().await.expect("flush");
    let mut tx = from.client().await;
    let tl = tx.open_sender(Some(address), false).await.expect("sender");
    let (state, got) = tokio::join!(
        send_message(&mut tx, tl, 1, text(body)),
        recv_text(&mut rx, rl)
    );
    assert_eq!(got, body);
    assert!(is_accepted(&state), "accepted end to end, got {state:?}");
}

#[tokio::test]
async fn an_edge_router_carries_traffic_both_ways_through_its_uplink() {
    let a = interior("A", &[]).await;
    let b = interior("B", &[ir(&a)]).await;
    await_route(&a, "B").await;
    let e = edge("E", &[ir(&b)]).await;
    await_edge(&b, "E", 0).await;
    // Interior to edge, two hops (A → B → E), and edge to interior.
    one_message(&a, &e, "to-edge", "down").await;
    one_message(&e, &a, "from-edge", "up").await;
    // The edge router takes no part in link state.
    let routes = a.log_text();
    let last = routes
        .lines()
        .rev()
        .find(|l| l.contains("mesh routes"))
        .unwrap_or_default()
        .to_string();
    assert!(
        !last.contains("E via"),
        "edge routers are not in the mesh's routes: {last}"
    );
}

#[tokio::test]
async fn an_edge_router_fails_over_to_its_next_uplink() {
    let a = interior("A", &[]).await;
    let mut b = interior("B", &[ir(&a)]).await;
    await_route(&a, "B").await;
    let e = edge("E", &[ir(&b), ir(&a)]).await;
    await_edge(&b, "E", 0).await;
    one_message(&a, &e, "before", "via B").await;

    let seen = a.log_text().lines().count();
    b.kill();
    await_edge(&a, "E", seen).await;
    one_message(&a, &e, "after", "via A").await;
    one_message(&e, &a, "after-up", "up via A").await;
}
