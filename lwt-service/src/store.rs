//! Wills on disk: one redb table, `space \0 client` → the will, written
//! by one thread in batches (every change that arrived while the previous
//! commit ran goes in the next: one sync for all of them). redb commits
//! are durable when `commit` returns, so a will acknowledged after its
//! batch committed survives a `kill -9`.
//!
//! redb rather than a journal of our own: wills are few and small next to
//! messages, written once per connect and disconnect, and a key-value
//! table needs no compaction of ours.

use std::path::Path;
use std::sync::mpsc as std_mpsc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use crate::wills::{Change, Key, Kind, Owner, State, Will};

const WILLS: TableDefinition<&str, &[u8]> = TableDefinition::new("wills");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Every redb error converts into `redb::Error`, so `?` needs no
    /// conversion of ours per error type.
    #[error("will store: {0}")]
    Db(#[from] redb::Error),
    #[error("will store: cannot start its writer: {0}")]
    Thread(std::io::Error),
}

/// A batch of changes and who waits for them to be on disk.
type Batch = (Vec<Change>, oneshot::Sender<Result<(), String>>);

/// The writer thread's handle.
#[derive(Clone)]
pub struct Store {
    tx: std_mpsc::Sender<Batch>,
    thread: std::sync::Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

fn key_str(k: &Key) -> String {
    format!("{}\0{}", k.0, k.1)
}

fn put_str(out: &mut BytesMut, s: &str) {
    out.put_u32(s.len() as u32);
    out.put_slice(s.as_bytes());
}

fn get_str(b: &mut &[u8]) -> Option<String> {
    let n = get_u32(b)? as usize;
    if b.len() < n {
        return None;
    }
    let s = std::str::from_utf8(&b[..n]).ok()?.to_string();
    b.advance(n);
    Some(s)
}

fn get_u32(b: &mut &[u8]) -> Option<u32> {
    (b.len() >= 4).then(|| b.get_u32())
}

/// Encodes a will for the table (its attach instance is not kept).
pub fn encode(w: &Will) -> Vec<u8> {
    let mut out = BytesMut::with_capacity(w.message.len() + 128);
    out.put_u8(2); // format version (1: without claims)
    out.put_u8(match w.kind {
        Kind::Gateway => 0,
        Kind::Amqp => 1,
    });
    put_str(&mut out, &w.reg);
    put_str(&mut out, &w.owner.space);
    put_str(&mut out, &w.owner.container);
    put_str(&mut out, &w.owner.link_name);
    match &w.user {
        Some(u) => {
            out.put_u8(1);
            put_str(&mut out, u);
        }
        None => out.put_u8(0),
    }
    match &w.claims {
        Some(c) => {
            out.put_u8(1);
            put_str(&mut out, c);
        }
        None => out.put_u8(0),
    }
    put_str(&mut out, &w.to);
    out.put_u8(w.qos);
    out.put_u8(u8::from(w.retain));
    out.put_u32(w.delay);
    match w.state {
        State::Due { at } => {
            out.put_u8(1);
            out.put_u64(at);
        }
        // An orphan is kept as live: after a restart both are orphans.
        State::Live | State::Orphan { .. } => out.put_u8(0),
    }
    out.put_u32(w.message.len() as u32);
    out.put_slice(&w.message);
    out.to_vec()
}

/// Decodes a will from the table.
pub fn decode(mut b: &[u8]) -> Option<Will> {
    let b = &mut b;
    if b.len() < 2 {
        return None;
    }
    let version = b.get_u8();
    if !matches!(version, 1 | 2) {
        return None;
    }
    let kind = match b.get_u8() {
        0 => Kind::Gateway,
        1 => Kind::Amqp,
        _ => return None,
    };
    let reg = get_str(b)?;
    let owner = Owner {
        space: get_str(b)?,
        container: get_str(b)?,
        link_name: get_str(b)?,
    };
    let user = match (!b.is_empty()).then(|| b.get_u8())? {
        1 => Some(get_str(b)?),
        _ => None,
    };
    let claims = match version {
        2 => match (!b.is_empty()).then(|| b.get_u8())? {
            1 => Some(get_str(b)?),
            _ => None,
        },
        _ => None,
    };
    let to = get_str(b)?;
    if b.len() < 7 {
        return None;
    }
    let (qos, retain, delay) = (b.get_u8(), b.get_u8() != 0, b.get_u32());
    let state = match b.get_u8() {
        1 if b.len() >= 8 => State::Due { at: b.get_u64() },
        0 => State::Live,
        _ => return None,
    };
    let n = get_u32(b)? as usize;
    if b.len() != n {
        return None;
    }
    Some(Will {
        kind,
        reg,
        owner,
        instance: 0,
        user,
        claims,
        to,
        qos,
        retain,
        delay,
        message: Bytes::copy_from_slice(b),
        state,
    })
}

impl Store {
    /// Opens (or creates) the store in `dir` and reads every will back;
    /// starts the writer thread.
    ///
    /// # Errors
    /// The database cannot be opened or is damaged.
    pub fn open(dir: &Path) -> Result<(Store, Vec<(Key, Will)>), StoreError> {
        let (db, wills) = read(dir)?;
        let (tx, rx) = std_mpsc::channel::<Batch>();
        let thread = std::thread::Builder::new()
            .name("lwt-store".into())
            .spawn(move || writer(db, rx))
            .map_err(StoreError::Thread)?;
        let thread = std::sync::Arc::new(std::sync::Mutex::new(Some(thread)));
        Ok((Store { tx, thread }, wills))
    }

    /// Stops the writer once what was given to it is written, and waits
    /// for it (when this is the last handle), closing the database.
    pub fn close(self) {
        let Store { tx, thread } = self;
        drop(tx);
        let handle = thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    /// Writes `changes` in one transaction; the answer comes once they
    /// are durable (or failed).
    pub fn write(&self, changes: Vec<Change>) -> oneshot::Receiver<Result<(), String>> {
        let (tx, rx) = oneshot::channel();
        if let Err(std_mpsc::SendError((_, tx))) = self.tx.send((changes, tx)) {
            let _ = tx.send(Err("the will store stopped".into()));
        }
        rx
    }
}

/// Opens (or creates) the database in `dir` and reads every will.
fn read(dir: &Path) -> Result<(Database, Vec<(Key, Will)>), redb::Error> {
    let db = Database::create(dir.join("wills.redb"))?;
    let tx = db.begin_write()?;
    tx.open_table(WILLS)?;
    tx.commit()?;
    let mut wills = Vec::new();
    {
        let rx = db.begin_read()?;
        let t = rx.open_table(WILLS)?;
        for row in t.iter()? {
            let (k, v) = row?;
            let Some((space, client)) = k.value().split_once('\0') else {
                tracing::warn!(key = k.value(), "a will with a malformed key skipped");
                continue;
            };
            match decode(v.value()) {
                Some(w) => wills.push(((space.to_string(), client.to_string()), w)),
                None => tracing::warn!(space, "a will that does not decode skipped"),
            }
        }
    }
    Ok((db, wills))
}

fn writer(db: Database, rx: std_mpsc::Receiver<Batch>) {
    while let Ok(first) = rx.recv() {
        // Everything that waits goes in this commit.
        let mut batches = vec![first];
        while let Ok(b) = rx.try_recv() {
            batches.push(b);
        }
        let result =
            commit(&db, batches.iter().flat_map(|(c, _)| c.iter())).map_err(|e| e.to_string());
        if let Err(e) = &result {
            tracing::error!(error = %e, "cannot write wills");
        }
        for (_, done) in batches {
            let _ = done.send(result.clone());
        }
    }
}

fn commit<'a>(db: &Database, changes: impl Iterator<Item = &'a Change>) -> Result<(), redb::Error> {
    let tx = db.begin_write()?;
    {
        let mut t = tx.open_table(WILLS)?;
        for c in changes {
            match c {
                Change::Put(k, w) => {
                    t.insert(key_str(k).as_str(), encode(w).as_slice())?;
                }
                Change::Delete(k) => {
                    t.remove(key_str(k).as_str())?;
                }
            }
        }
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(state: State, user: Option<&str>) -> Will {
        Will {
            kind: Kind::Amqp,
            reg: "r".into(),
            owner: Owner {
                space: "s".into(),
                container: "c".into(),
                link_name: "l".into(),
            },
            instance: 0,
            user: user.map(str::to_string),
            claims: user.map(|_| r#"{"roles":["app"]}"#.to_string()),
            to: "t/1".into(),
            qos: 2,
            retain: true,
            delay: 30,
            message: Bytes::from_static(b"\x00\x53\x77\xa1\x02hi"),
            state,
        }
    }

    #[test]
    fn a_will_reads_back_as_written() {
        for w in [
            sample(State::Live, Some("alice")),
            sample(State::Due { at: 123_456 }, None),
        ] {
            assert_eq!(decode(&encode(&w)), Some(w));
        }
    }

    #[test]
    fn truncated_records_do_not_decode() {
        let b = encode(&sample(State::Live, Some("u")));
        for n in 0..b.len() {
            assert!(decode(&b[..n]).is_none(), "{n} bytes");
        }
    }

    #[tokio::test]
    async fn what_was_committed_is_there_after_reopening() {
        let dir = std::env::temp_dir().join(format!("lwt-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        {
            let (s, wills) = Store::open(&dir).unwrap();
            assert!(wills.is_empty());
            let k = |c: &str| ("s".to_string(), c.to_string());
            s.write(vec![
                Change::Put(k("a"), Box::new(sample(State::Live, None))),
                Change::Put(k("b"), Box::new(sample(State::Live, None))),
            ])
            .await
            .unwrap()
            .unwrap();
            s.write(vec![Change::Delete(k("a"))])
                .await
                .unwrap()
                .unwrap();
            s.close();
        }
        let (_, wills) = Store::open(&dir).unwrap();
        assert_eq!(wills.len(), 1);
        assert_eq!(wills[0].0 .1, "b");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
