//! The broker's message log: segmented append-only files, a CRC on every
//! record, group commit (one `fdatasync` for every record that arrived
//! while the previous sync ran), recovery by replay, and retirement of
//! segments whose records are all acknowledged.
//!
//! Written here rather than taken from a storage crate: it is the
//! broker's hot path and its durability contract (a record is reported
//! durable only after the sync that covers it) is the product.
//!
//! On disk, a directory of segments named by their first sequence number
//! (`00000000000000000001.seg`), each a run of records:
//!
//! ```text
//! u32 payload length | u32 CRC-32 of (sequence, payload) | u64 sequence | payload
//! ```
//!
//! Sequence numbers are consecutive across segments. A crash can only tear
//! the end of the last segment: recovery stops at the first record there
//! that is short or fails its CRC and truncates the file to it. Damage
//! anywhere else is reported, never skipped silently.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, RwLock};

use bytes::Bytes;
use tokio::sync::oneshot;
use tracing::{info, warn};

const HEADER: usize = 16;

/// Journal settings.
#[derive(Debug, Clone)]
pub struct JournalConfig {
    pub dir: PathBuf,
    /// A new segment starts when a record would take the active one past this.
    pub segment_bytes: u64,
    /// Largest record payload accepted.
    pub max_record: usize,
    /// `fdatasync` on commit (turn off only for tests of the format).
    pub sync: bool,
}

impl JournalConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        JournalConfig {
            dir: dir.into(),
            segment_bytes: 64 << 20,
            max_record: 16 << 20,
            sync: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal i/o: {0}")]
    Io(#[from] io::Error),
    #[error("journal segment {segment} is damaged at byte {offset}: {why}")]
    Corrupt {
        segment: PathBuf,
        offset: u64,
        why: &'static str,
    },
    #[error("record of {0} bytes is larger than the journal's limit")]
    TooLarge(usize),
    #[error("the journal has stopped")]
    Closed,
    #[error("record {0} is not in the journal")]
    Missing(u64),
}

/// A recovered record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub payload: Bytes,
}

#[derive(Debug)]
struct Segment {
    first_seq: u64,
    path: PathBuf,
}

/// Where each record of each segment starts, so a record can be read back
/// by its sequence number (paging): segment first seq → offsets.
type Index = Arc<RwLock<BTreeMap<u64, Vec<u32>>>>;

/// Reads records back from the journal's files by sequence number.
#[derive(Debug)]
pub struct JournalReader {
    dir: PathBuf,
    index: Index,
    files: HashMap<u64, File>,
}

impl JournalReader {
    /// The payload of record `seq`, read from its segment and checked
    /// against its CRC.
    ///
    /// # Errors
    /// The record is not in the journal (retired) or does not read back
    /// intact.
    pub fn read(&mut self, seq: u64) -> Result<Bytes, JournalError> {
        let (first, offset) = {
            let idx = self.index.read().unwrap_or_else(|p| p.into_inner());
            let (first, offsets) = idx
                .range(..=seq)
                .next_back()
                .ok_or(JournalError::Missing(seq))?;
            let at = usize::try_from(seq - first).unwrap_or(usize::MAX);
            (*first, *offsets.get(at).ok_or(JournalError::Missing(seq))?)
        };
        if !self.files.contains_key(&first) {
            if self.files.len() > 64 {
                self.files.clear();
            }
            let f = File::open(self.dir.join(segment_name(first)))?;
            self.files.insert(first, f);
        }
        let f = &self.files[&first];
        let mut h = [0u8; HEADER];
        f.read_exact_at(&mut h, u64::from(offset))?;
        let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let sum = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        let got = u64::from_be_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
        let mut payload = vec![0u8; len];
        f.read_exact_at(&mut payload, u64::from(offset) + HEADER as u64)?;
        if got != seq || crc(seq, &payload) != sum {
            return Err(JournalError::Corrupt {
                segment: self.dir.join(segment_name(first)),
                offset: u64::from(offset),
                why: "record read back does not match",
            });
        }
        Ok(Bytes::from(payload))
    }
}

/// The journal itself: single-threaded; [`JournalHandle`] puts it behind a
/// committer thread for group commit.
#[derive(Debug)]
pub struct Journal {
    cfg: JournalConfig,
    segments: Vec<Segment>,
    active: File,
    active_len: u64,
    next_seq: u64,
    buf: Vec<u8>,
    index: Index,
    /// Offsets of records in `buf`, for the index once written.
    pending_offsets: Vec<u32>,
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.seg")
}

fn crc(seq: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_be_bytes());
    h.update(payload);
    h.finalize()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// What replaying one segment found.
struct Replay {
    records: Vec<Record>,
    offsets: Vec<u32>,
    /// Where valid data ends.
    valid_len: u64,
    /// Why it stopped before the end of the file, if it did.
    torn: Option<&'static str>,
}

fn replay_segment(data: &Bytes, mut expect: u64, max_record: usize) -> Replay {
    let mut at = 0usize;
    let mut records = Vec::new();
    let mut offsets = Vec::new();
    let torn = loop {
        if at == data.len() {
            break None;
        }
        if data.len() - at < HEADER {
            break Some("short record header");
        }
        let h = &data[at..at + HEADER];
        let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let sum = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        let seq = u64::from_be_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
        if len > max_record || data.len() - at - HEADER < len {
            break Some("record runs past the end");
        }
        let payload = data.slice(at + HEADER..at + HEADER + len);
        if crc(seq, &payload) != sum {
            break Some("CRC mismatch");
        }
        if seq != expect {
            break Some("sequence out of order");
        }
        records.push(Record { seq, payload });
        offsets.push(at as u32);
        expect += 1;
        at += HEADER + len;
    };
    Replay {
        records,
        offsets,
        valid_len: at as u64,
        torn,
    }
}

impl Journal {
    /// Opens (or creates) the journal in `cfg.dir` and replays it. Returns
    /// every record on disk, in order. A torn tail of the last segment is
    /// cut off.
    ///
    /// # Errors
    /// I/O errors, or damage before the last segment's tail.
    pub fn open(cfg: JournalConfig) -> Result<(Journal, Vec<Record>), JournalError> {
        Journal::open_inner(cfg, true)
    }

    /// Opens (or creates) the journal in `cfg.dir`, checking every record
    /// and cutting off a torn tail as [`Journal::open`] does, without
    /// keeping the records: read them with [`Journal::replay`] (a segment
    /// in memory at a time).
    ///
    /// # Errors
    /// I/O errors, or damage before the last segment's tail.
    pub fn open_indexed(cfg: JournalConfig) -> Result<Journal, JournalError> {
        Journal::open_inner(cfg, false).map(|(j, _)| j)
    }

    /// Reads every record on disk, in order, one segment in memory at a
    /// time (a record's payload shares its segment's buffer: copy what is
    /// kept).
    ///
    /// # Errors
    /// A segment cannot be read.
    pub fn replay(&self, each: &mut dyn FnMut(Record)) -> Result<(), JournalError> {
        for seg in &self.segments {
            let data = Bytes::from(fs::read(&seg.path)?);
            let r = replay_segment(&data, seg.first_seq, self.cfg.max_record);
            r.records.into_iter().for_each(&mut *each);
        }
        Ok(())
    }

    fn open_inner(cfg: JournalConfig, keep: bool) -> Result<(Journal, Vec<Record>), JournalError> {
        fs::create_dir_all(&cfg.dir)?;
        let mut segments: Vec<Segment> = fs::read_dir(&cfg.dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let first_seq = name.strip_suffix(".seg")?.parse().ok()?;
                Some(Segment {
                    first_seq,
                    path: e.path(),
                })
            })
            .collect();
        segments.sort_by_key(|s| s.first_seq);
        let mut records = Vec::new();
        let mut count = 0usize;
        let mut index = BTreeMap::new();
        let mut next_seq = segments.first().map_or(1, |s| s.first_seq);
        let n = segments.len();
        let mut active_len = 0;
        for (i, seg) in segments.iter().enumerate() {
            if seg.first_seq != next_seq {
                return Err(JournalError::Corrupt {
                    segment: seg.path.clone(),
                    offset: 0,
                    why: "segment does not follow the previous one",
                });
            }
            let data = Bytes::from(fs::read(&seg.path)?);
            let r = replay_segment(&data, next_seq, cfg.max_record);
            if let Some(why) = r.torn {
                if i + 1 < n {
                    return Err(JournalError::Corrupt {
                        segment: seg.path.clone(),
                        offset: r.valid_len,
                        why,
                    });
                }
                warn!(segment = %seg.path.display(), offset = r.valid_len, reason = why, "journal tail torn by a crash; truncating");
                let f = OpenOptions::new().write(true).open(&seg.path)?;
                f.set_len(r.valid_len)?;
                f.sync_all()?;
            }
            next_seq += r.records.len() as u64;
            count += r.records.len();
            active_len = r.valid_len;
            if keep {
                records.extend(r.records);
            }
            index.insert(seg.first_seq, r.offsets);
        }
        if segments.is_empty() {
            let path = cfg.dir.join(segment_name(next_seq));
            File::create(&path)?.sync_all()?;
            sync_dir(&cfg.dir)?;
            segments.push(Segment {
                first_seq: next_seq,
                path,
            });
            index.insert(next_seq, Vec::new());
        }
        let last = segments.last().map(|s| s.path.clone()).unwrap_or_default();
        let active = OpenOptions::new().append(true).open(&last)?;
        info!(dir = %cfg.dir.display(), segments = segments.len(), records = count, next_seq, "journal recovered");
        Ok((
            Journal {
                cfg,
                segments,
                active,
                active_len,
                next_seq,
                buf: Vec::with_capacity(1 << 20),
                index: Arc::new(RwLock::new(index)),
                pending_offsets: Vec::new(),
            },
            records,
        ))
    }

    /// A reader of this journal's records (for paged-out messages).
    pub fn reader(&self) -> JournalReader {
        JournalReader {
            dir: self.cfg.dir.clone(),
            index: self.index.clone(),
            files: HashMap::new(),
        }
    }

    /// The sequence number the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Buffers a record; it is durable after the next [`Journal::commit`].
    ///
    /// # Errors
    /// The payload is too large, or rolling to a new segment failed.
    pub fn append(&mut self, payload: &[u8]) -> Result<u64, JournalError> {
        if payload.len() > self.cfg.max_record {
            return Err(JournalError::TooLarge(payload.len()));
        }
        let size = (HEADER + payload.len()) as u64;
        if self.active_len + self.buf.len() as u64 + size > self.cfg.segment_bytes
            && self.active_len + self.buf.len() as u64 > 0
        {
            self.roll()?;
        }
        let seq = self.next_seq;
        self.pending_offsets
            .push((self.active_len + self.buf.len() as u64) as u32);
        self.buf
            .extend_from_slice(&(payload.len() as u32).to_be_bytes());
        self.buf.extend_from_slice(&crc(seq, payload).to_be_bytes());
        self.buf.extend_from_slice(&seq.to_be_bytes());
        self.buf.extend_from_slice(payload);
        self.next_seq += 1;
        Ok(seq)
    }

    /// Writes the buffered records to the active segment without syncing.
    fn write_buf(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.active.write_all(&self.buf)?;
            self.active_len += self.buf.len() as u64;
            self.buf.clear();
            let first = self.segments.last().map_or(0, |s| s.first_seq);
            let mut idx = self.index.write().unwrap_or_else(|p| p.into_inner());
            idx.entry(first)
                .or_default()
                .append(&mut self.pending_offsets);
        }
        Ok(())
    }

    /// Finishes the active segment (written and synced) and starts the next.
    fn roll(&mut self) -> Result<(), JournalError> {
        self.write_buf()?;
        if self.cfg.sync {
            self.active.sync_data()?;
        }
        let path = self.cfg.dir.join(segment_name(self.next_seq));
        self.active = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        if self.cfg.sync {
            sync_dir(&self.cfg.dir)?;
        }
        self.segments.push(Segment {
            first_seq: self.next_seq,
            path,
        });
        self.index
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(self.next_seq, Vec::new());
        self.active_len = 0;
        Ok(())
    }

    /// Writes and syncs everything appended so far: after this returns,
    /// those records survive a crash.
    ///
    /// # Errors
    /// I/O errors (the records are then not durable).
    pub fn commit(&mut self) -> Result<(), JournalError> {
        self.write_buf()?;
        if self.cfg.sync {
            self.active.sync_data()?;
        }
        Ok(())
    }

    /// Deletes the segments that hold only records below `seq` (all
    /// acknowledged); the active segment stays. Returns how many went.
    ///
    /// # Errors
    /// I/O errors while deleting.
    pub fn retire_before(&mut self, seq: u64) -> Result<usize, JournalError> {
        let mut gone = 0;
        // Segment i holds [first_seq(i), first_seq(i+1)).
        while self.segments.len() > 1 && self.segments[1].first_seq <= seq {
            let s = self.segments.remove(0);
            self.index
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&s.first_seq);
            fs::remove_file(&s.path)?;
            gone += 1;
        }
        if gone > 0 && self.cfg.sync {
            sync_dir(&self.cfg.dir)?;
        }
        Ok(gone)
    }

    /// Number of segment files.
    pub fn segments(&self) -> usize {
        self.segments.len()
    }

    /// The first seq of the second segment: records below it hold the
    /// oldest segment (0 while there is only the active one).
    pub fn oldest_segment_end(&self) -> u64 {
        self.segments.get(1).map_or(0, |s| s.first_seq)
    }
}

/// What to do once a record is durable (or failed): called on the
/// committer thread, in sequence order.
pub type Done = Box<dyn FnOnce(Result<u64, JournalError>) + Send>;

/// What [`JournalHandle::barrier_then`] calls, with the next sequence
/// number.
pub type Then = Box<dyn FnOnce(u64) + Send>;

enum Request {
    Append(Bytes, Done),
    Retire(u64),
    /// Reader `shard` (of `floors`) needs nothing below this seq any more:
    /// segments below every reader's floor are deleted.
    Floor(usize, u64),
    /// Called with the next seq once every record queued before it is
    /// durable and its callback has run.
    BarrierThen(Then),
    /// Records appended together, with consecutive sequence numbers (a
    /// transaction and its commit record); `Done` gets the first's.
    AppendMany(Vec<Bytes>, Done),
    /// Answered once everything queued before it is durable.
    Barrier(oneshot::Sender<()>),
}

/// Counters of the committer, for benchmarks and `stat`.
#[derive(Debug, Default)]
pub struct JournalStats {
    pub records: AtomicU64,
    pub syncs: AtomicU64,
    /// [`Journal::oldest_segment_end`] as of the last commit: records
    /// below it are worth writing again when they alone keep the oldest
    /// segment.
    pub oldest_segment_end: AtomicU64,
}

/// A cloneable handle to a journal behind a committer thread: appends from
/// every producer that arrive while a sync runs share the next sync.
#[derive(Debug, Clone)]
pub struct JournalHandle {
    tx: mpsc::Sender<Request>,
    pub stats: Arc<JournalStats>,
}

impl JournalHandle {
    /// Starts the committer thread.
    ///
    /// # Errors
    /// The thread could not be started.
    pub fn start(journal: Journal) -> io::Result<JournalHandle> {
        JournalHandle::start_shared(journal, 1)
    }

    /// Starts the committer thread for `readers` queue tasks, each of
    /// which says how far back it needs the journal ([`JournalHandle::floor`]).
    ///
    /// # Errors
    /// The thread could not be started.
    pub fn start_shared(mut journal: Journal, readers: usize) -> io::Result<JournalHandle> {
        let (tx, rx) = mpsc::channel::<Request>();
        let stats = Arc::new(JournalStats::default());
        stats
            .oldest_segment_end
            .store(journal.oldest_segment_end(), Ordering::Relaxed);
        let st = stats.clone();
        std::thread::Builder::new()
            .name("journal".into())
            .spawn(move || {
                let mut waiting: Vec<(u64, Done)> = Vec::new();
                let mut floors = vec![0u64; readers.max(1)];
                let mut then: Vec<(u64, Then)> = Vec::new();
                while let Ok(first) = rx.recv() {
                    let mut retire = None;
                    let mut barriers = Vec::new();
                    let mut failed: Option<String> = None;
                    // Everything already queued joins this batch.
                    for req in
                        std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok()))
                    {
                        match req {
                            Request::Append(payload, done) => match journal.append(&payload) {
                                Ok(seq) => waiting.push((seq, done)),
                                Err(e) => done(Err(e)),
                            },
                            Request::AppendMany(payloads, done) => {
                                let mut first = None;
                                let mut err = None;
                                for p in &payloads {
                                    match journal.append(p) {
                                        Ok(seq) => {
                                            first.get_or_insert(seq);
                                        }
                                        Err(e) => {
                                            err = Some(e);
                                            break;
                                        }
                                    }
                                }
                                // A batch cut short has no commit record
                                // (the last): recovery ignores the rest.
                                match (err, first) {
                                    (None, Some(seq)) => waiting.push((seq, done)),
                                    (Some(e), _) => done(Err(e)),
                                    (None, None) => done(Err(JournalError::Closed)),
                                }
                            }
                            Request::Retire(seq) => retire = Some(seq),
                            Request::Floor(reader, seq) => {
                                if let Some(f) = floors.get_mut(reader) {
                                    *f = seq;
                                }
                                let low = floors.iter().copied().min().unwrap_or(0);
                                if low > 0 {
                                    retire = Some(low);
                                }
                            }
                            Request::BarrierThen(f) => then.push((journal.next_seq(), f)),
                            Request::Barrier(b) => barriers.push(b),
                        }
                    }
                    if !waiting.is_empty() {
                        match journal.commit() {
                            Ok(()) => {
                                st.syncs.fetch_add(1, Ordering::Relaxed);
                                st.records
                                    .fetch_add(waiting.len() as u64, Ordering::Relaxed);
                            }
                            Err(e) => failed = Some(e.to_string()),
                        }
                        for (seq, done) in waiting.drain(..) {
                            let r = match &failed {
                                None => Ok(seq),
                                Some(e) => Err(JournalError::Io(io::Error::other(e.clone()))),
                            };
                            done(r);
                        }
                    }
                    for b in barriers.drain(..) {
                        let _ = b.send(());
                    }
                    for (seq, f) in then.drain(..) {
                        f(seq);
                    }
                    if let Some(seq) = retire {
                        if let Err(e) = journal.retire_before(seq) {
                            warn!(error = %e, "cannot retire journal segments");
                        }
                    }
                    st.oldest_segment_end
                        .store(journal.oldest_segment_end(), Ordering::Relaxed);
                }
            })?;
        Ok(JournalHandle { tx, stats })
    }

    /// Appends a record; resolves once it is on disk (after the sync that
    /// covers it) with its sequence number.
    ///
    /// # Errors
    /// The journal stopped, the record is too large, or the write or sync
    /// failed.
    pub async fn append(&self, payload: Bytes) -> Result<u64, JournalError> {
        let (done, wait) = oneshot::channel();
        self.append_then(
            payload,
            Box::new(move |r| {
                let _ = done.send(r);
            }),
        )?;
        wait.await.map_err(|_| JournalError::Closed)?
    }

    /// Queues a record now (records keep the order of these calls) and
    /// calls `done` on the committer thread once it is durable, in
    /// sequence order.
    ///
    /// # Errors
    /// The journal stopped (`done` is not called).
    pub fn append_then(&self, payload: Bytes, done: Done) -> Result<(), JournalError> {
        self.tx
            .send(Request::Append(payload, done))
            .map_err(|_| JournalError::Closed)
    }

    /// Queues records to be written together, with consecutive sequence
    /// numbers and in one sync; `done` gets the first's once all are
    /// durable. Nothing else is written between them.
    ///
    /// # Errors
    /// The journal stopped (`done` is not called).
    pub fn append_many(&self, payloads: Vec<Bytes>, done: Done) -> Result<(), JournalError> {
        self.tx
            .send(Request::AppendMany(payloads, done))
            .map_err(|_| JournalError::Closed)
    }

    /// Waits until everything appended before this call is durable.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Request::Barrier(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Reader `reader` (a queue task) needs no record below `seq`: the
    /// committer deletes segments below every reader's floor.
    pub fn floor(&self, reader: usize, seq: u64) {
        let _ = self.tx.send(Request::Floor(reader, seq));
    }

    /// Calls `f` with the next sequence number once everything appended
    /// before this call is durable and its callback has run.
    pub fn barrier_then(&self, f: Then) {
        let _ = self.tx.send(Request::BarrierThen(f));
    }

    /// Asks the committer to delete segments holding only records below `seq`.
    pub fn retire_before(&self, seq: u64) {
        let _ = self.tx.send(Request::Retire(seq));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    struct Dir(PathBuf);
    impl Dir {
        fn new(tag: &str) -> Dir {
            static N: AtomicU64 = AtomicU64::new(0);
            let p = std::env::temp_dir().join(format!(
                "flotilla-journal-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&p);
            Dir(p)
        }
        fn cfg(&self) -> JournalConfig {
            JournalConfig {
                sync: false,
                ..JournalConfig::new(&self.0)
            }
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn payloads(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| format!("message {i} {}", "x".repeat(i % 50)).into_bytes())
            .collect()
    }

    fn write_all(cfg: JournalConfig, p: &[Vec<u8>]) {
        let (mut j, _) = Journal::open(cfg).unwrap();
        for x in p {
            j.append(x).unwrap();
        }
        j.commit().unwrap();
    }

    fn last_segment(dir: &Path) -> PathBuf {
        let mut v: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v.pop().unwrap()
    }

    #[test]
    fn records_read_back_by_sequence_before_and_after_reopening() {
        let d = Dir::new("read");
        let cfg = JournalConfig {
            segment_bytes: 300,
            ..d.cfg()
        };
        let p = payloads(40);
        let (mut j, _) = Journal::open(cfg.clone()).unwrap();
        let mut r = j.reader();
        for x in &p[..20] {
            j.append(x).unwrap();
        }
        j.commit().unwrap();
        for x in &p[20..] {
            j.append(x).unwrap();
        }
        j.commit().unwrap();
        assert!(j.segments() > 3);
        for (i, x) in p.iter().enumerate() {
            assert_eq!(&r.read(i as u64 + 1).unwrap()[..], &x[..]);
        }
        assert!(matches!(r.read(41), Err(JournalError::Missing(41))));
        j.retire_before(10).unwrap();
        assert!(r.read(1).is_err(), "retired records are gone");
        drop(j);
        let (j, _) = Journal::open(cfg).unwrap();
        let mut r = j.reader();
        for (i, x) in p.iter().enumerate().skip(12) {
            assert_eq!(&r.read(i as u64 + 1).unwrap()[..], &x[..]);
        }
    }

    #[test]
    fn recovers_in_order_across_segments() {
        let d = Dir::new("order");
        let cfg = JournalConfig {
            segment_bytes: 300,
            ..d.cfg()
        };
        let p = payloads(40);
        write_all(cfg.clone(), &p);
        let (j, recs) = Journal::open(cfg.clone()).unwrap();
        assert!(j.segments() > 3, "small segments roll");
        assert_eq!(
            recs.iter().map(|r| r.payload.to_vec()).collect::<Vec<_>>(),
            p
        );
        assert_eq!(
            recs.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (1..=40).collect::<Vec<u64>>()
        );
        assert_eq!(j.next_seq(), 41);
        // Appending after recovery continues the sequence.
        drop(j);
        write_all(cfg.clone(), &payloads(2));
        let (_, recs) = Journal::open(cfg).unwrap();
        assert_eq!(recs.len(), 42);
        assert_eq!(recs.last().unwrap().seq, 42);
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_the_journal_goes_on() {
        let d = Dir::new("torn");
        let p = payloads(10);
        write_all(d.cfg(), &p);
        let seg = last_segment(&d.0);
        let full = fs::metadata(&seg).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(full - 3)
            .unwrap();
        let (mut j, recs) = Journal::open(d.cfg()).unwrap();
        assert_eq!(
            recs.len(),
            9,
            "the torn last record is dropped, the rest kept"
        );
        assert_eq!(
            j.append(b"after").unwrap(),
            10,
            "the sequence goes on from the last good record"
        );
        j.commit().unwrap();
        let (_, recs) = Journal::open(d.cfg()).unwrap();
        assert_eq!(recs.len(), 10);
        assert_eq!(&recs[9].payload[..], b"after");
    }

    #[test]
    fn a_crc_error_in_the_tail_drops_that_record_and_what_follows() {
        let d = Dir::new("crc");
        write_all(d.cfg(), &payloads(10));
        let seg = last_segment(&d.0);
        let mut data = fs::read(&seg).unwrap();
        let n = data.len();
        data[n - 40] ^= 0xff;
        fs::write(&seg, &data).unwrap();
        let (_, recs) = Journal::open(d.cfg()).unwrap();
        assert!(recs.len() < 10);
        assert!(recs.iter().enumerate().all(|(i, r)| r.seq == i as u64 + 1));
    }

    #[test]
    fn damage_before_the_last_segment_is_an_error_not_a_silent_loss() {
        let d = Dir::new("damage");
        let cfg = JournalConfig {
            segment_bytes: 300,
            ..d.cfg()
        };
        write_all(cfg.clone(), &payloads(40));
        let mut v: Vec<PathBuf> = fs::read_dir(&d.0)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        let mut data = fs::read(&v[0]).unwrap();
        data[20] ^= 0xff;
        fs::write(&v[0], &data).unwrap();
        assert!(matches!(
            Journal::open(cfg),
            Err(JournalError::Corrupt { .. })
        ));
    }

    #[test]
    fn retired_segments_are_deleted_and_the_rest_recovers() {
        let d = Dir::new("retire");
        let cfg = JournalConfig {
            segment_bytes: 300,
            ..d.cfg()
        };
        write_all(cfg.clone(), &payloads(40));
        let (mut j, _) = Journal::open(cfg.clone()).unwrap();
        let before = j.segments();
        let gone = j.retire_before(30).unwrap();
        assert!(gone > 0 && j.segments() == before - gone);
        drop(j);
        let (_, recs) = Journal::open(cfg).unwrap();
        assert!(
            recs.first().unwrap().seq <= 30,
            "no record at or above the mark is lost"
        );
        assert_eq!(recs.last().unwrap().seq, 40);
    }

    #[tokio::test]
    async fn group_commit_makes_every_append_durable_with_fewer_syncs() {
        let d = Dir::new("group");
        let cfg = JournalConfig {
            sync: true,
            ..JournalConfig::new(&d.0)
        };
        let (j, _) = Journal::open(cfg.clone()).unwrap();
        let h = JournalHandle::start(j).unwrap();
        let mut tasks = Vec::new();
        for t in 0..8 {
            let h = h.clone();
            tasks.push(tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..50 {
                    seqs.push(h.append(Bytes::from(format!("{t}-{i}"))).await.unwrap());
                }
                seqs
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all.sort();
        assert_eq!(
            all,
            (1..=400).collect::<Vec<u64>>(),
            "every append got its own sequence"
        );
        assert!(h.stats.syncs.load(Ordering::Relaxed) <= 400);
        drop(h);
        let (_, recs) = Journal::open(cfg).unwrap();
        assert_eq!(recs.len(), 400, "everything acknowledged is on disk");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever was committed is recovered exactly once and in order,
        /// wherever the file is cut after the commit.
        #[test]
        fn committed_records_survive_any_torn_tail(n in 1usize..40, extra in 0usize..10, cut in 0usize..2000) {
            let d = Dir::new("prop");
            let cfg = JournalConfig { segment_bytes: 400, ..d.cfg() };
            let committed = payloads(n);
            write_all(cfg.clone(), &committed);
            // Records written after the commit but not synced may be torn.
            let (mut j, _) = Journal::open(cfg.clone()).unwrap();
            for x in payloads(extra) { j.append(&x).unwrap(); }
            j.commit().unwrap();
            drop(j);
            let seg = last_segment(&d.0);
            let len = fs::metadata(&seg).unwrap().len();
            let keep = len.saturating_sub(cut as u64 % (len + 1));
            // Only cut into what came after the committed records.
            let (_, before) = Journal::open(cfg.clone()).unwrap();
            prop_assert_eq!(before.len(), n + extra);
            if extra > 0 {
                let committed_len: u64 = before.iter().filter(|r| r.seq as usize > n).map(|r| (HEADER + r.payload.len()) as u64).sum();
                let floor = len.saturating_sub(committed_len);
                OpenOptions::new().write(true).open(&seg).unwrap().set_len(keep.max(floor)).unwrap();
            }
            let (_, recs) = Journal::open(cfg).unwrap();
            prop_assert!(recs.len() >= n);
            for (i, r) in recs.iter().enumerate() {
                prop_assert_eq!(r.seq, i as u64 + 1);
                if i < n { prop_assert_eq!(&r.payload[..], &committed[i][..]); }
            }
        }
    }
}
