//! The broker's memory bound: past `--max-memory-mib`, message bodies stay
//! in the journal and are read back when delivered, also after a restart.

mod common;

use common::*;

async fn broker(dir: &TempDir) -> RouterProc {
    start_broker(dir, &["--max-memory-mib", "1"]).await
}

/// The broker's `$stat` document.
async fn stat_json(b: &RouterProc) -> serde_json::Value {
    let mut c = b.client().await;
    let (link, _) = c.open_receiver(Some("$stat"), 1).await.expect("stat");
    let body = recv_text(&mut c, link).await;
    serde_json::from_str(&body).expect("stat is JSON")
}

/// Bodies of about 1 KiB, numbered.
fn bodies(n: usize) -> Vec<String> {
    numbered(&"x".repeat(1000), n)
}

#[tokio::test]
async fn a_queue_larger_than_memory_is_paged_and_delivered_whole_in_order() {
    let dir = TempDir::new("paging");
    let mut b = broker(&dir).await;
    let sent = bodies(3000);
    let mut p = b.fe2o3("producer").await;
    let mut tx = p.sender("tx", "big").await;
    assert_all_accepted(&send_all(&mut tx, &sent).await);

    // About 3 MB against a 1 MiB budget: most bodies are on disk only.
    let stat = stat_json(&b).await;
    let m = &stat["memory"];
    assert!(m["pagedOut"].as_u64().unwrap_or(0) > 1000, "{m}");
    assert!(m["held"].as_u64().unwrap_or(u64::MAX) <= 1 << 20, "{m}");

    let mut c = b.fe2o3("consumer").await;
    let mut rx = c.receiver("rx", "big").await;
    let first = recv_n(&mut rx, 1500).await;
    assert!(first == sent[..1500], "the first 1500, whole and in order");
    drop(rx);
    drop(c);

    // After a crash recovery pages too. Acknowledgements are not waited
    // for, so some of the first 1500 may come again: the rest is what
    // was sent from some point on, in order.
    b.kill();
    let b = broker(&dir).await;
    let depth = stat_json(&b).await["queues"][0]["depth"]
        .as_u64()
        .expect("a depth") as usize;
    assert!((1500..=3000).contains(&depth), "{depth} left");
    let mut c = b.fe2o3("consumer-2").await;
    let mut rx = c.receiver("rx", "big").await;
    let rest = recv_n(&mut rx, depth).await;
    assert!(rest == sent[3000 - depth..], "the rest, whole and in order");
    let stat = stat_json(&b).await;
    assert!(
        stat["memory"]["pagedIn"].as_u64().unwrap_or(0) > 0,
        "{}",
        stat["memory"]
    );
}

/// The broker's peak resident memory, in bytes (Linux: VmHWM).
fn peak_rss(b: &RouterProc) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", b.child.id()))
        .expect("the broker's /proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kib * 1024
}

#[tokio::test]
async fn recovery_pages_while_it_reads_a_journal_five_times_the_memory_budget() {
    use flotilla_amqp::message::{encode_message, MessageParts};
    use flotilla_broker::journal::{Journal, JournalConfig};
    use flotilla_broker::store;

    // 320 MiB of messages in the journal (written directly: the format
    // the broker writes), against a 64 MiB budget.
    let dir = TempDir::new("recovery-pages");
    const N: usize = 5 * 64 * 16;
    let filler = "y".repeat(64 * 1024 - 64);
    {
        let cfg = JournalConfig {
            sync: false,
            ..JournalConfig::new(dir.path().join("journal"))
        };
        let (mut j, _) = Journal::open(cfg).expect("a journal");
        for i in 0..N {
            let body = format!("{i:06} {filler}");
            let m = encode_message(&MessageParts {
                durable: true,
                body: body.as_bytes(),
                text: true,
                ..Default::default()
            });
            j.append(&store::publish(&["default/big"], 0, &m))
                .expect("append");
            if i % 256 == 255 {
                j.commit().expect("commit");
            }
        }
        j.commit().expect("commit");
    }

    let b = start_broker(&dir, &["--max-memory-mib", "64"]).await;
    let stat = stat_json(&b).await;
    assert_eq!(
        stat["queues"][0]["depth"].as_u64(),
        Some(N as u64),
        "{stat}"
    );
    let peak = peak_rss(&b);
    assert!(
        peak < 192 << 20,
        "recovering 320 MiB with a 64 MiB budget peaked at {} MiB",
        peak >> 20
    );
    // Delivered whole and in order, paged bodies read back.
    let mut c = b.fe2o3("consumer").await;
    let mut rx = c.receiver("rx", "big").await;
    let first = recv_n(&mut rx, 100).await;
    for (i, m) in first.iter().enumerate() {
        assert!(
            m.starts_with(&format!("{i:06} ")),
            "message {i} out of order"
        );
        assert_eq!(m.len(), 64 * 1024 - 64 + 7);
    }
}
