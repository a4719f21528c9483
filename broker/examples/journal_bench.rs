//! Journal throughput with group commit: P producers append R-byte
//! records, each waiting for its record to be durable before the next
//! (like producers waiting for `accepted`), for S seconds.
//!
//! `cargo run --release -p flotilla-broker --example journal_bench -- [DIR] [PRODUCERS] [BYTES] [SECONDS]`

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_broker::journal::{Journal, JournalConfig, JournalHandle};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = args.get(1).cloned().unwrap_or_else(|| {
        std::env::temp_dir()
            .join("flotilla-journal-bench")
            .display()
            .to_string()
    });
    let producers: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(64);
    let bytes: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(1024);
    let secs: f64 = args.get(4).and_then(|a| a.parse().ok()).unwrap_or(5.0);
    let _ = std::fs::remove_dir_all(&dir);
    let (j, _) = Journal::open(JournalConfig::new(&dir)).expect("open journal");
    let h = JournalHandle::start(j).expect("committer");
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..producers {
        let h = h.clone();
        let body = Bytes::from(vec![7u8; bytes]);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < until {
                let t = Instant::now();
                h.append(body.clone()).await.expect("append");
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("producer"));
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort();
    let records = h.stats.records.load(Ordering::Relaxed);
    let syncs = h.stats.syncs.load(Ordering::Relaxed);
    let p50 = lat.get(lat.len() / 2).copied().unwrap_or_default();
    let p99 = lat.get(lat.len() * 99 / 100).copied().unwrap_or_default();
    println!(
        "{producers} producers, {bytes} B records, {elapsed:.1} s: {:.0} durable records/s, {:.4} syncs per record, append-to-durable p50 {:.2} ms p99 {:.2} ms",
        records as f64 / elapsed,
        syncs as f64 / records.max(1) as f64,
        p50.as_secs_f64() * 1000.0,
        p99.as_secs_f64() * 1000.0
    );
    let _ = std::fs::remove_dir_all(&dir);
}
