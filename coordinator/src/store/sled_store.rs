//! The sled store (sled 0.34.7, pinned). The only module that names sled.
//!
//! Trees: `runs` (run id BE -> RunRecord), `events` (run id BE ++ seq BE -> EventRecord),
//! `applied` (stage key ++ version BE -> AppliedRecord), `results` (stage key -> result),
//! `submissions` (run id BE -> what a coordinator needs to rebuild the run, opaque bytes),
//! `audit` (seq BE -> AuditRecord), `journal` (see below), `meta`.
//!
//! A transition is atomic through the `journal`, not through sled transactions: its writes,
//! each already framed and sealed exactly as it will be stored, are first written as one
//! journal record (a single-key write, which sled makes atomic), then applied key by key.
//! Every record goes to the journal's one key, [`JOURNAL_KEY`], replacing the previous
//! transition's: transitions apply one at a time, and sled writes its log in order and
//! recovers a prefix of it, so a record's transition was complete once the next record is
//! written. After a crash the record left is the last transition's, and the store opens by
//! applying whatever of its writes is missing (they are puts and removes by key). Only a
//! write that appends a new event or audit entry goes without a record when it is alone: no
//! record ever names its key, so replaying an older record after it cannot undo it; any
//! other write, even alone, takes a record, so the record left never holds a value that a
//! later write replaced. (Until 2026-12 each record had a number of its own and was removed
//! after its writes: a sled write more per transition. Such a record left by a crash is
//! still replayed and removed.) sled 0.34's multi-tree transactions would do the same job,
//! but each one seals and writes sled's log buffer twice (a thread handoff and a
//! `sync_file_range` each) even when nobody flushes: about ten per stage, the largest cost
//! of a run before the journal.
//! `flush()` makes every transition applied before it durable; `flush_async` is never used
//! (it deadlocks in 0.34).
//!
//! Damage is detected, never read as "no history": every value is framed with a CRC-32 of
//! its bytes (records written before framing start with `{` and are read as they are), and
//! after every flush a high-water mark (the highest run id and the number of events written,
//! with a CRC) is written beside the store in `baton.hwm`. A store that opens with fewer runs
//! or events than its high-water mark lost records (sled drops the tail of its log after a
//! damaged entry) and is refused. The mark is written after the flush (overwritten in place;
//! it only grows), so it never claims more than is durable.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use baton_common::group_flush::GroupFlush;
use baton_common::seal::{Sealer, StateKey};

use super::{
    decode, AppliedRecord, AuditRecord, EventRecord, Op, RunRecord, StageKey, StageResultRecord,
    Store, StoreError, Transition,
};

#[derive(Debug, Clone)]
pub struct SledStore {
    /// Random, created with the directory and kept in `meta` (see [`Store::id`]).
    id: String,
    db: sled::Db,
    runs: sled::Tree,
    events: sled::Tree,
    applied: sled::Tree,
    results: sled::Tree,
    submissions: sled::Tree,
    /// The audit log by sequence number (not sealed: it holds no secret, and `baton audit`
    /// reads it as it is).
    audit: sled::Tree,
    /// The last transition's writes, at [`JOURNAL_KEY`] (see the module's text).
    journal: sled::Tree,
    /// Held while a transition is applied, so transitions apply one at a time, each after
    /// its record.
    journal_lock: std::sync::Arc<std::sync::Mutex<()>>,
    /// Counters (`next_id`).
    meta: sled::Tree,
    /// The directory, for messages and the high-water mark.
    dir: PathBuf,
    /// Encrypts what may hold secret values (applied migrations' variables, stage results,
    /// submissions) before it is written.
    sealer: std::sync::Arc<Sealer>,
    /// What the high-water mark will say after the next flush.
    max_run: std::sync::Arc<AtomicU64>,
    events_written: std::sync::Arc<AtomicU64>,
    /// Group commit: transitions that arrive while a flush runs share the next one.
    group: std::sync::Arc<GroupFlush>,
    high_water: std::sync::Arc<HighWaterFile>,
}

impl SledStore {
    /// The state directory this store lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Opens (creating if needed) the store in `dir`. A second process on the same directory
    /// is refused with [`StoreError::Locked`].
    pub fn open(dir: &Path) -> Result<SledStore, StoreError> {
        SledStore::open_keyed(dir, &StateKey::default())
    }

    /// How the store configures sled for `dir` (also what the whole-run benchmark's durable
    /// floor opens its database with, so both measure the same sled).
    pub fn sled_config(dir: &Path) -> sled::Config {
        sled::Config::new()
            .path(dir)
            .cache_capacity(64 * 1024 * 1024)
            .mode(sled::Mode::HighThroughput)
    }

    /// [`SledStore::open`] with the state key from `key` (see [`StateKey`]).
    pub fn open_keyed(dir: &Path, key: &StateKey) -> Result<SledStore, StoreError> {
        let shown = dir.display().to_string();
        std::fs::create_dir_all(dir).map_err(|e| open_error(&shown, &e))?;
        let db = SledStore::sled_config(dir).open().map_err(|e| match e {
            sled::Error::Io(io)
                if io.kind() == std::io::ErrorKind::WouldBlock
                    || io.to_string().contains("lock") =>
            {
                StoreError::Locked {
                    dir: shown.clone(),
                    holder: lock_holder(dir),
                }
            }
            sled::Error::Io(io) => open_error(&shown, &io),
            sled::Error::Corruption { .. } => StoreError::Damaged {
                dir: shown.clone(),
                what: "its log".to_owned(),
                message: e.to_string(),
            },
            other => StoreError::Open {
                dir: shown.clone(),
                message: other.to_string(),
                hint: "see the message; nothing was changed".to_owned(),
            },
        })?;
        restrict(dir).map_err(|e| open_error(&shown, &e))?;
        write_holder(dir);
        let tree = |name: &str| db.open_tree(name).map_err(|e| sled_open_error(&shown, e));
        let meta = tree("meta")?;
        let id = store_id(&db, &meta).map_err(|message| StoreError::Damaged {
            dir: shown.clone(),
            what: "its id".to_owned(),
            message,
        })?;
        let sealer = open_sealer(dir, key, &db, &meta).map_err(|message| StoreError::Open {
            dir: shown.clone(),
            message,
            hint: "give the key this state was written with (--state-key-file, BATON_STATE_KEY, BATON_STATE_KEY_FILE, or the directory's state.key); nothing was changed".to_owned(),
        })?;
        let store = SledStore {
            group: std::sync::Arc::default(),
            high_water: std::sync::Arc::default(),
            id,
            runs: tree("runs")?,
            events: tree("events")?,
            applied: tree("applied")?,
            results: tree("results")?,
            submissions: tree("submissions")?,
            audit: tree("audit")?,
            journal: tree("journal")?,
            journal_lock: std::sync::Arc::default(),
            meta,
            db,
            dir: dir.to_path_buf(),
            sealer: std::sync::Arc::new(sealer),
            max_run: std::sync::Arc::default(),
            events_written: std::sync::Arc::default(),
        };
        store.replay_journal()?;
        store.check_high_water()?;
        Ok(store)
    }

    /// Finishes the transition a crash interrupted: when any write of the journal's record
    /// is missing, all of them are applied again, in order (a record whose writes are all
    /// there changes nothing, and stays). A numbered record of an older version is applied and removed. A damaged
    /// record is damage (its transition's writes may be half applied), never skipped.
    fn replay_journal(&self) -> Result<(), StoreError> {
        let shown = self.dir.display().to_string();
        let mut wrote = false;
        for entry in self.journal.iter() {
            let (k, v) = entry.map_err(|e| sled_open_error(&shown, e))?;
            let writes =
                unframe(&v)
                    .and_then(Write::decode_all)
                    .map_err(|message| StoreError::Damaged {
                        dir: shown.clone(),
                        what: "a transition it was applying when it stopped".to_owned(),
                        message,
                    })?;
            // All of them again, in order, if any is missing (a transition may write a key
            // twice).
            let complete = writes.iter().all(|w| self.holds(w).unwrap_or(false));
            if !complete {
                tracing::info!(dir = %shown, writes = writes.len(), "finishing a transition interrupted by a stop");
                self.put_all(&writes)
                    .map_err(|e| sled_open_error(&shown, e))?;
                wrote = true;
            }
            if k.as_ref() != JOURNAL_KEY {
                self.journal
                    .remove(&k)
                    .map_err(|e| sled_open_error(&shown, e))?;
                wrote = true;
            }
        }
        if wrote {
            self.db.flush().map_err(|e| sled_open_error(&shown, e))?;
        }
        Ok(())
    }

    /// Whether `w`'s key already holds what it writes (or is gone, for a removal).
    fn holds(&self, w: &Write) -> sled::Result<bool> {
        let now = self.tree(w.tree).get(&w.key)?;
        Ok(now.as_deref() == w.value.as_deref())
    }

    fn lock_journal(&self) -> std::sync::MutexGuard<'_, ()> {
        // A poisoned lock only means a panic elsewhere; there is nothing in it to be wrong.
        self.journal_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn tree(&self, id: TreeId) -> &sled::Tree {
        match id {
            TreeId::Runs => &self.runs,
            TreeId::Events => &self.events,
            TreeId::Applied => &self.applied,
            TreeId::Results => &self.results,
            TreeId::Submissions => &self.submissions,
            TreeId::Audit => &self.audit,
        }
    }

    fn put_all(&self, writes: &[Write]) -> sled::Result<()> {
        for w in writes {
            let tree = self.tree(w.tree);
            match &w.value {
                Some(v) => tree.insert(&w.key, v.as_slice())?,
                None => tree.remove(&w.key)?,
            };
        }
        Ok(())
    }

    /// Counts what the store holds and compares it with the high-water mark: fewer runs or
    /// events than were once durable means records were lost.
    fn check_high_water(&self) -> Result<(), StoreError> {
        let shown = self.dir.display().to_string();
        let max_run = match self.runs.last().map_err(|e| sled_open_error(&shown, e))? {
            Some((k, _)) => <[u8; 8]>::try_from(k.as_ref()).map_or(0, u64::from_be_bytes),
            None => 0,
        };
        let mut events = 0u64;
        for k in self.events.iter().keys() {
            k.map_err(|e| sled_open_error(&shown, e))?;
            events += 1;
        }
        self.max_run.store(max_run, Ordering::SeqCst);
        self.events_written.store(events, Ordering::SeqCst);
        let Some(mark) = read_high_water(&self.dir).map_err(|message| StoreError::Damaged {
            dir: shown.clone(),
            what: format!("its high-water mark `{HIGH_WATER}`"),
            message,
        })?
        else {
            // A store from before high-water marks, or a new one: start one now.
            return Ok(());
        };
        if max_run < mark.runs || events < mark.events {
            return Err(StoreError::Damaged {
                dir: shown,
                what: "records were lost".to_owned(),
                message: format!(
                    "it holds runs up to {max_run} and {events} events, but runs up to {} and {} events were written to it (it was truncated or damaged)",
                    mark.runs, mark.events
                ),
            });
        }
        Ok(())
    }

    /// Flushes, then records the high-water mark the flush made durable.
    fn flush(&self) -> Result<(), StoreError> {
        let mark = HighWater {
            runs: self.max_run.load(Ordering::SeqCst),
            events: self.events_written.load(Ordering::SeqCst),
        };
        self.db.flush().map_err(io)?;
        if let Err(e) = self.high_water.write(&self.dir, &mark) {
            // The data is durable; only damage detection is weaker until the next flush.
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot write the high-water mark");
        }
        Ok(())
    }

    /// A value read from the store: its frame checked, then decoded.
    fn read<T: for<'de> serde::Deserialize<'de>>(
        &self,
        what: impl Fn() -> String,
        bytes: &[u8],
    ) -> Result<T, StoreError> {
        let dir = || self.dir.display().to_string();
        let opened = self
            .sealer
            .open(bytes)
            .map_err(|message| StoreError::Damaged {
                dir: dir(),
                what: what(),
                message,
            })?;
        let payload = unframe(&opened).map_err(|message| StoreError::Damaged {
            dir: dir(),
            what: what(),
            message,
        })?;
        decode(&what(), payload).map_err(|e| match e {
            StoreError::Newer { what, format, .. } => StoreError::Newer {
                dir: dir(),
                what,
                format,
            },
            StoreError::Corrupt { what, message } => StoreError::Damaged {
                dir: dir(),
                what,
                message,
            },
            other => other,
        })
    }
}

/// The store's [`Sealer`]: the key check in `meta` is verified, or written (and flushed) for
/// a new store.
fn open_sealer(
    dir: &Path,
    key: &StateKey,
    db: &sled::Db,
    meta: &sled::Tree,
) -> Result<Sealer, String> {
    let check = meta.get(b"key_check").map_err(|e| e.to_string())?;
    let (sealer, new_check) = Sealer::for_store(dir, key, check.as_deref())?;
    if let Some(c) = new_check {
        meta.insert(b"key_check", c).map_err(|e| e.to_string())?;
        db.flush().map_err(|e| e.to_string())?;
    }
    Ok(sealer)
}

/// The file that names the process holding the store: its pid, command line and start time,
/// written when the store is opened, read when another process is refused.
const HOLDER: &str = "baton.holder";

/// Records this process as the store's holder (best effort: the name only helps a person).
/// Only the command's words are kept (`baton stages up`), never its flags or values: a
/// `--set` value may be a secret.
fn write_holder(dir: &Path) {
    let command: Vec<String> = std::env::args()
        .take_while(|a| !a.starts_with('-'))
        .take(3)
        .map(|a| a.rsplit('/').next().unwrap_or_default().to_owned())
        .collect();
    let since = now_hms();
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dir.join(HOLDER))
        .and_then(|mut f| writeln!(f, "{} {since} {}", std::process::id(), command.join(" ")));
    if let Err(e) = written {
        tracing::debug!(error = %e, "the store's holder could not be recorded");
    }
}

/// ` (pid 123: baton stages up, since 21:50:03 UTC)` when the recorded holder is alive.
fn lock_holder(dir: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(dir.join(HOLDER)) else {
        return String::new();
    };
    let mut parts = text.trim().splitn(3, ' ');
    let (Some(pid), Some(since), command) = (parts.next(), parts.next(), parts.next()) else {
        return String::new();
    };
    let alive = pid
        .parse::<u32>()
        .is_ok_and(|p| p != std::process::id() && Path::new("/proc").join(p.to_string()).exists());
    if !alive {
        return String::new();
    }
    format!(
        " (pid {pid}: {}, since {since} UTC)",
        command.unwrap_or("baton").trim()
    )
}

fn now_hms() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "{:02}:{:02}:{:02}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    )
}

/// The file beside the store that says how much was durable.
const HIGH_WATER: &str = "baton.hwm";

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct HighWater {
    /// The highest run id written.
    runs: u64,
    /// How many events were written.
    events: u64,
}

fn read_high_water(dir: &Path) -> Result<Option<HighWater>, String> {
    let text = match std::fs::read(dir.join(HIGH_WATER)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let payload = unframe(&text)?;
    serde_json::from_slice(payload)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// The high-water mark file, kept open: each flush overwrites it in place. A new mark is
/// never shorter than the one before (its counts only grow), so the write covers the old one
/// whole; and no file is created or renamed per flush (that cost more than the flush).
#[derive(Debug, Default)]
struct HighWaterFile(std::sync::Mutex<Option<(std::fs::File, usize)>>);

impl HighWaterFile {
    fn write(&self, dir: &Path, mark: &HighWater) -> std::io::Result<()> {
        use std::os::unix::fs::{FileExt, OpenOptionsExt};
        let mut slot = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.is_none() {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(dir.join(HIGH_WATER))?;
            let len = usize::try_from(f.metadata()?.len()).unwrap_or(usize::MAX);
            *slot = Some((f, len));
        }
        let Some((f, len)) = slot.as_mut() else {
            return Ok(());
        };
        let bytes = encode_framed(mark);
        f.write_all_at(&bytes, 0)?;
        if bytes.len() < *len {
            f.set_len(u64::try_from(bytes.len()).unwrap_or(u64::MAX))?;
        }
        *len = bytes.len();
        Ok(())
    }
}

/// The journal's one key (see the module's text). Above every number the journal's
/// records had before, which are replayed and removed when a store opens.
const JOURNAL_KEY: [u8; 8] = u64::MAX.to_be_bytes();

/// The trees a transition writes to, by their number in a journal record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TreeId {
    Runs = 1,
    Events = 2,
    Applied = 3,
    Results = 4,
    Submissions = 5,
    Audit = 6,
}

impl TreeId {
    fn of(b: u8) -> Option<TreeId> {
        Some(match b {
            1 => TreeId::Runs,
            2 => TreeId::Events,
            3 => TreeId::Applied,
            4 => TreeId::Results,
            5 => TreeId::Submissions,
            6 => TreeId::Audit,
            _ => return None,
        })
    }
}

/// One key written (or removed, `value: None`) by a transition.
#[derive(Debug, Clone, PartialEq)]
struct Write {
    tree: TreeId,
    key: Vec<u8>,
    value: Option<Vec<u8>>,
}

impl Write {
    /// Whether it adds an event or an audit entry: a key written once, never replaced or
    /// removed.
    fn appends(&self) -> bool {
        matches!(self.tree, TreeId::Events | TreeId::Audit) && self.value.is_some()
    }

    /// A journal record's bytes: per write, the tree (1 byte), the key's length (4 bytes
    /// BE) and key, then 0 (removed) or 1, the value's length (4 bytes BE) and value.
    fn encode_all(writes: &[Write]) -> Vec<u8> {
        let mut out = Vec::new();
        let len = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes();
        for w in writes {
            out.push(w.tree as u8);
            out.extend_from_slice(&len(w.key.len()));
            out.extend_from_slice(&w.key);
            match &w.value {
                Some(v) => {
                    out.push(1);
                    out.extend_from_slice(&len(v.len()));
                    out.extend_from_slice(v);
                }
                None => out.push(0),
            }
        }
        out
    }

    fn decode_all(mut bytes: &[u8]) -> Result<Vec<Write>, String> {
        fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
            if bytes.len() < n {
                return Err("its journal record is cut short".to_owned());
            }
            let (head, rest) = bytes.split_at(n);
            *bytes = rest;
            Ok(head)
        }
        fn len(bytes: &mut &[u8]) -> Result<usize, String> {
            let b = take(bytes, 4)?;
            Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        }
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let tree = TreeId::of(take(&mut bytes, 1)?[0])
                .ok_or_else(|| "its journal record names no tree baton has".to_owned())?;
            let n = len(&mut bytes)?;
            let key = take(&mut bytes, n)?.to_vec();
            let value = match take(&mut bytes, 1)?[0] {
                0 => None,
                1 => {
                    let n = len(&mut bytes)?;
                    Some(take(&mut bytes, n)?.to_vec())
                }
                _ => return Err("its journal record is not one baton wrote".to_owned()),
            };
            out.push(Write { tree, key, value });
        }
        Ok(out)
    }
}

/// The first byte of a framed value (a JSON record starts with `{`).
const FRAMED: u8 = 0xB1;

/// `FRAMED`, the CRC-32 of `payload` (big-endian), `payload`.
/// `value` encoded and framed (see [`frame`]), written once into one buffer.
fn encode_framed<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Most records fit; a larger one grows it (serde_json starts at 128 bytes).
    let mut v = Vec::with_capacity(256);
    v.extend_from_slice(&[FRAMED, 0, 0, 0, 0]);
    // Serialising these plain records cannot fail: no maps with non-string keys, no floats.
    if serde_json::to_writer(&mut v, value).is_err() {
        v.truncate(5);
    }
    let sum = crc32fast::hash(&v[5..]).to_be_bytes();
    v[1..5].copy_from_slice(&sum);
    v
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(payload.len() + 5);
    v.push(FRAMED);
    v.extend_from_slice(&crc32fast::hash(payload).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// The payload of a framed value, checked; an unframed JSON record (written before framing)
/// as it is.
fn unframe(bytes: &[u8]) -> Result<&[u8], String> {
    match bytes.first() {
        Some(b'{') => Ok(bytes),
        Some(&FRAMED) if bytes.len() >= 5 => {
            let (sum, payload) = bytes[1..].split_at(4);
            let want = u32::from_be_bytes([sum[0], sum[1], sum[2], sum[3]]);
            if crc32fast::hash(payload) == want {
                Ok(payload)
            } else {
                Err("its checksum does not match its bytes".to_owned())
            }
        }
        _ => Err("it is not a record baton wrote".to_owned()),
    }
}

/// Why a directory could not be opened, with advice that fits: a full disk or a path or
/// permission mistake is not damage, and restoring a backup would not help.
fn open_error(dir: &str, e: &std::io::Error) -> StoreError {
    use std::io::ErrorKind;
    let hint = match e.kind() {
        ErrorKind::StorageFull => {
            "the disk is full: free space, then try again; nothing was changed"
        }
        ErrorKind::PermissionDenied => {
            "check that this user may read and write it; nothing was changed"
        }
        ErrorKind::NotFound | ErrorKind::NotADirectory | ErrorKind::AlreadyExists => {
            "check the path (--state-dir / --data-dir); nothing was changed"
        }
        ErrorKind::ReadOnlyFilesystem => "the file system is read-only; nothing was changed",
        _ => "nothing was changed",
    };
    StoreError::Open {
        dir: dir.to_owned(),
        message: e.to_string(),
        hint: hint.to_owned(),
    }
}

fn sled_open_error(dir: &str, e: sled::Error) -> StoreError {
    match e {
        sled::Error::Io(io) => open_error(dir, &io),
        other => StoreError::Damaged {
            dir: dir.to_owned(),
            what: "its log".to_owned(),
            message: other.to_string(),
        },
    }
}

/// The store's id: read from `meta`, or created (random) and flushed on first open.
fn store_id(db: &sled::Db, meta: &sled::Tree) -> Result<String, String> {
    if let Some(v) = meta.get(b"store_id").map_err(|e| e.to_string())? {
        return String::from_utf8(v.to_vec())
            .map_err(|_| "the store id is damaged (not UTF-8)".to_owned());
    }
    let id = baton_common::ids::random_hex().map_err(|e| format!("no random source: {e}"))?;
    // Only one process opens the directory (sled's lock), so no other writer races this.
    meta.insert(b"store_id", id.as_bytes())
        .map_err(|e| e.to_string())?;
    db.flush().map_err(|e| e.to_string())?;
    Ok(id)
}

/// The state directory and what is in it are its owner's alone (0700 / 0600): it holds run
/// history and exported variables. The directory's mode also covers files sled adds later.
fn restrict(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let mode = if entry.file_type()?.is_dir() {
            0o700
        } else {
            0o600
        };
        std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

fn io(e: sled::Error) -> StoreError {
    StoreError::Io(e.to_string())
}

fn run_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

fn event_key(run: u64, seq: u64) -> Vec<u8> {
    let mut k = run.to_be_bytes().to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn applied_key(key: &StageKey, version: u64) -> Vec<u8> {
    let mut k = key.bytes();
    k.extend_from_slice(&version.to_be_bytes());
    k
}

impl SledStore {
    /// What a transition writes, each value framed and sealed as it is stored.
    fn writes(&self, t: &Transition) -> Vec<Write> {
        let put = |tree, key: Vec<u8>, value: Vec<u8>| Write {
            tree,
            key,
            value: Some(value),
        };
        let remove = |tree, key: Vec<u8>| Write {
            tree,
            key,
            value: None,
        };
        t.ops
            .iter()
            .map(|op| match op {
                Op::PutRun(r) => put(TreeId::Runs, run_key(r.id).to_vec(), encode_framed(r)),
                Op::AppendEvent { run, event } => put(
                    TreeId::Events,
                    event_key(*run, event.seq),
                    encode_framed(event),
                ),
                Op::PutApplied { key, record } => put(
                    TreeId::Applied,
                    applied_key(key, record.version),
                    self.sealer.seal(&encode_framed(record)),
                ),
                Op::RemoveApplied { key, version } => {
                    remove(TreeId::Applied, applied_key(key, *version))
                }
                Op::PutResult { key, record } => put(
                    TreeId::Results,
                    key.bytes(),
                    self.sealer.seal(&encode_framed(record)),
                ),
                Op::RemoveResult { key } => remove(TreeId::Results, key.bytes()),
                Op::PutSubmission { run, bytes } => put(
                    TreeId::Submissions,
                    run_key(*run).to_vec(),
                    self.sealer.seal(&frame(bytes)),
                ),
                Op::AppendAudit(a) => put(TreeId::Audit, run_key(a.seq).to_vec(), encode_framed(a)),
            })
            .collect()
    }

    /// Applies a transition atomically (through the journal), not flushed.
    fn apply(&self, t: &Transition) -> Result<(), StoreError> {
        let writes = self.writes(t);
        {
            let _one_at_a_time = self.lock_journal();
            // Alone, an append needs no record (see the module's text).
            let alone = matches!(&writes[..], [w] if w.appends());
            if !alone {
                self.journal
                    .insert(JOURNAL_KEY, frame(&Write::encode_all(&writes)))
                    .map_err(io)?;
            }
            self.put_all(&writes).map_err(io)?;
        }
        // What the high-water mark says once this is flushed.
        for op in &t.ops {
            match op {
                Op::PutRun(r) => {
                    self.max_run.fetch_max(r.id, Ordering::SeqCst);
                }
                Op::AppendEvent { .. } => {
                    self.events_written.fetch_add(1, Ordering::SeqCst);
                }
                _ => {}
            }
        }
        Ok(())
    }
}

impl Store for SledStore {
    fn id(&self) -> &str {
        &self.id
    }

    fn next_id(&self) -> Result<u64, StoreError> {
        // A plain counter, so ids people read stay small. No flush here: the commit that
        // records the id's run flushes the counter with it (one log, recovered as a prefix),
        // so a durable id never repeats across crashes. (Fencing tokens use sled's
        // `generate_id`.)
        let next = self
            .meta
            .update_and_fetch(b"next_id", |old| {
                let n = old
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map_or(0, u64::from_be_bytes);
                Some((n + 1).to_be_bytes().to_vec())
            })
            .map_err(io)?
            .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map_or(1, u64::from_be_bytes);
        Ok(next)
    }

    fn fencing_token(&self) -> Result<u64, StoreError> {
        // Monotonic across crashes without a flush per call: after a crash sled resumes
        // above every id it may have handed out.
        // generate_id starts at 0; tokens start at 1 (0 means "no token": local mode).
        self.db.generate_id().map(|id| id + 1).map_err(io)
    }

    fn commit(&self, t: Transition) -> Result<(), StoreError> {
        self.apply(&t)?;
        // Durable before the caller acts on it: a flush that started after this transaction
        // was applied covers it, whoever runs it.
        self.sync()
    }

    fn commit_unflushed(&self, t: Transition) -> Result<(), StoreError> {
        self.apply(&t)
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.group.flush_after_this(|| self.flush())
    }

    fn run(&self, id: u64) -> Result<Option<RunRecord>, StoreError> {
        match self.runs.get(run_key(id)).map_err(io)? {
            Some(v) => self.read(|| format!("run {id}"), &v).map(Some),
            None => Ok(None),
        }
    }

    fn has_run(&self, id: u64) -> Result<bool, StoreError> {
        self.runs.contains_key(run_key(id)).map_err(io)
    }

    fn runs(&self) -> Result<Vec<RunRecord>, StoreError> {
        self.runs
            .iter()
            .map(|kv| {
                kv.map_err(io).and_then(|(k, v)| {
                    let id = <[u8; 8]>::try_from(k.as_ref()).map_or(0, u64::from_be_bytes);
                    self.read(|| format!("run {id}"), &v)
                })
            })
            .collect()
    }

    fn events(&self, run: u64, from_seq: u64) -> Result<Vec<EventRecord>, StoreError> {
        self.events
            .range(event_key(run, from_seq)..event_key(run, u64::MAX))
            .map(|kv| {
                kv.map_err(io)
                    .and_then(|(_, v)| self.read(|| format!("an event of run {run}"), &v))
            })
            .collect()
    }

    fn applied(&self, key: &StageKey) -> Result<Vec<AppliedRecord>, StoreError> {
        self.applied
            .scan_prefix(key.bytes())
            .map(|kv| {
                kv.map_err(io).and_then(|(k, v)| {
                    let version = k
                        .len()
                        .checked_sub(8)
                        .and_then(|at| <[u8; 8]>::try_from(&k[at..]).ok())
                        .map_or(0, u64::from_be_bytes);
                    self.read(
                        || {
                            format!(
                                "stage `{}` of `{}`: applied migration {version}",
                                key.stage, key.project
                            )
                        },
                        &v,
                    )
                })
            })
            .collect()
    }

    fn is_applied(&self, key: &StageKey, version: u64) -> Result<bool, StoreError> {
        self.applied
            .contains_key(applied_key(key, version))
            .map_err(io)
    }

    fn result(&self, key: &StageKey) -> Result<Option<StageResultRecord>, StoreError> {
        match self.results.get(key.bytes()).map_err(io)? {
            Some(v) => self
                .read(
                    || format!("stage `{}` of `{}`: its result", key.stage, key.project),
                    &v,
                )
                .map(Some),
            None => Ok(None),
        }
    }

    fn audit(&self) -> Result<Vec<AuditRecord>, StoreError> {
        self.audit
            .iter()
            .map(|kv| {
                kv.map_err(io).and_then(|(k, v)| {
                    let seq = <[u8; 8]>::try_from(k.as_ref()).map_or(0, u64::from_be_bytes);
                    self.read(|| format!("audit entry {seq}"), &v)
                })
            })
            .collect()
    }

    fn last_audit(&self) -> Result<Option<AuditRecord>, StoreError> {
        match self.audit.last().map_err(io)? {
            Some((k, v)) => {
                let seq = <[u8; 8]>::try_from(k.as_ref()).map_or(0, u64::from_be_bytes);
                self.read(|| format!("audit entry {seq}"), &v).map(Some)
            }
            None => Ok(None),
        }
    }

    fn submission(&self, run: u64) -> Result<Option<Vec<u8>>, StoreError> {
        match self.submissions.get(run_key(run)).map_err(io)? {
            Some(v) => self
                .sealer
                .open(&v)
                .and_then(|opened| unframe(&opened).map(<[u8]>::to_vec))
                .map(Some)
                .map_err(|message| StoreError::Damaged {
                    dir: self.dir.display().to_string(),
                    what: format!("the submission of run {run}"),
                    message,
                }),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod damage_tests {
    use super::*;
    use crate::store::{RunStatus, FORMAT};

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("baton-damage-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// Opens `dir`, waiting (bounded) for a previous handle's lock to go.
    fn reopen(dir: &Path) -> Result<SledStore, StoreError> {
        for _ in 0..500 {
            match SledStore::open(dir) {
                Err(StoreError::Locked { .. }) => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                other => return other,
            }
        }
        SledStore::open(dir)
    }

    fn run(id: u64) -> Op {
        Op::PutRun(RunRecord {
            v: FORMAT,
            id,
            uid: String::new(),
            project: "p".into(),
            direction: "up".into(),
            selection: crate::planner::Selection::All,
            plan_digest: "d".into(),
            plan: serde_json::Value::Null,
            created_at_ms: 1,
            status: RunStatus::Running,
            finished_at_ms: None,
            down: None,
            by: String::new(),
            release: String::new(),
        })
    }

    fn event(run: u64, seq: u64) -> Op {
        Op::AppendEvent {
            run,
            event: EventRecord {
                v: FORMAT,
                seq,
                at_ms: 1,
                stage: None,
                kind: crate::store::EventKind::Notice {
                    message: "m".into(),
                },
            },
        }
    }

    fn result(run_id: u64, value: &str) -> Op {
        Op::PutResult {
            key: StageKey::new("p", "s"),
            record: StageResultRecord {
                v: FORMAT,
                run_id,
                at_ms: 1,
                exports: [("x".to_owned(), value.to_owned())].into(),
                secret: Vec::new(),
            },
        }
    }

    fn result_value(s: &SledStore) -> Option<String> {
        s.result(&StageKey::new("p", "s"))
            .unwrap()
            .map(|r| r.exports["x"].clone())
    }

    #[test]
    fn a_transition_cut_short_by_a_stop_is_finished_when_the_store_opens() {
        let dir = temp("journal");
        {
            let s = SledStore::open(&dir).unwrap();
            let mut done = Transition::new();
            done.push(run(1)).push(event(1, 1));
            s.commit(done).unwrap();
            assert_eq!(s.journal.len(), 1, "the last transition's record stays");
            // What a stop between a transition's record and its writes leaves: the record.
            let mut t = Transition::new();
            t.push(event(1, 2)).push(event(1, 3)).push(run(2));
            let writes = s.writes(&t);
            s.journal
                .insert(JOURNAL_KEY, frame(&Write::encode_all(&writes)))
                .unwrap();
            s.db.flush().unwrap();
            assert!(s.run(2).unwrap().is_none());
        }
        let s = reopen(&dir).unwrap();
        assert!(s.run(2).unwrap().is_some(), "the run it wrote is there");
        let seqs: Vec<u64> = s.events(1, 0).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
        // The next transition applies, and its record replaces the replayed one.
        let mut next = Transition::new();
        next.push(event(2, 1)).push(event(2, 2));
        s.commit(next).unwrap();
        assert_eq!(s.events(2, 0).unwrap().len(), 2);
        assert_eq!(s.journal.len(), 1);
    }

    /// The record left at the journal's key belongs to a transition that completed; opening
    /// the store must not undo anything written after it.
    #[test]
    fn a_complete_record_left_in_the_journal_undoes_nothing_written_after_it() {
        let dir = temp("journal-after");
        {
            let s = SledStore::open(&dir).unwrap();
            let mut first = Transition::new();
            first.push(result(1, "one")).push(event(1, 1));
            s.commit(first).unwrap();
            // A write alone that replaces a value takes a record of its own: were it to go
            // without one, opening would replay the first record over it.
            let mut replace = Transition::new();
            replace.push(result(2, "two"));
            s.commit(replace).unwrap();
            // An append alone takes none; the record stays the replacement's.
            let mut append = Transition::new();
            append.push(event(1, 2));
            s.commit(append).unwrap();
            assert_eq!(result_value(&s).as_deref(), Some("two"));
        }
        let s = reopen(&dir).unwrap();
        assert_eq!(result_value(&s).as_deref(), Some("two"));
        assert_eq!(s.events(1, 0).unwrap().len(), 2);
        assert_eq!(
            s.journal.len(),
            1,
            "a complete record changes nothing and stays"
        );
    }

    /// Stores written before the journal had one key hold numbered records; one left by a
    /// stop is applied and removed.
    #[test]
    fn a_numbered_record_of_an_older_version_is_replayed_and_removed() {
        let dir = temp("journal-numbered");
        {
            let s = SledStore::open(&dir).unwrap();
            let mut t = Transition::new();
            t.push(run(1)).push(event(1, 1));
            s.journal
                .insert(7u64.to_be_bytes(), frame(&Write::encode_all(&s.writes(&t))))
                .unwrap();
            s.db.flush().unwrap();
        }
        let s = reopen(&dir).unwrap();
        assert!(s.run(1).unwrap().is_some());
        assert_eq!(s.events(1, 0).unwrap().len(), 1);
        assert!(
            s.journal.is_empty(),
            "the numbered record is removed once replayed"
        );
    }

    #[test]
    fn a_damaged_journal_record_is_damage_and_nothing_is_applied() {
        let dir = temp("journal-damage");
        {
            let s = SledStore::open(&dir).unwrap();
            let mut t = Transition::new();
            t.push(run(1)).push(event(1, 1));
            let mut bytes = frame(&Write::encode_all(&s.writes(&t)));
            let last = bytes.len() - 1;
            bytes[last] ^= 0x55;
            s.journal.insert(1u64.to_be_bytes(), bytes).unwrap();
            s.db.flush().unwrap();
        }
        match reopen(&dir) {
            Err(StoreError::Damaged { dir: d, what, .. }) => {
                assert!(d.contains("baton-damage-journal-damage"), "{d}");
                assert!(what.contains("transition"), "{what}");
            }
            other => panic!("expected damage, got {other:?}"),
        }
    }

    #[test]
    fn a_record_framed_as_it_is_encoded_is_the_record_framed_after() {
        let Op::AppendEvent { event, .. } = event(1, 1) else {
            unreachable!()
        };
        let json = serde_json::to_vec(&event).unwrap();
        assert_eq!(encode_framed(&event), frame(&json));
        assert_eq!(unframe(&encode_framed(&event)).unwrap(), json.as_slice());
    }

    #[test]
    fn journal_records_read_back_as_written() {
        let writes = vec![
            Write {
                tree: TreeId::Events,
                key: vec![0, 1, 2],
                value: Some(b"value".to_vec()),
            },
            Write {
                tree: TreeId::Applied,
                key: vec![9; 40],
                value: None,
            },
            Write {
                tree: TreeId::Audit,
                key: Vec::new(),
                value: Some(Vec::new()),
            },
        ];
        let bytes = Write::encode_all(&writes);
        assert_eq!(Write::decode_all(&bytes).unwrap(), writes);
        // Cut inside a write, it is refused; cut anywhere, its frame refuses it, so a torn
        // record is never read as fewer writes.
        assert!(Write::decode_all(&bytes[..bytes.len() - 1]).is_err());
        let framed = frame(&bytes);
        for n in 0..framed.len() {
            assert!(
                unframe(&framed[..n]).and_then(Write::decode_all).is_err(),
                "{n}"
            );
        }
    }

    #[test]
    fn a_flipped_byte_in_a_record_is_damage_naming_the_directory_and_the_stage() {
        let dir = temp("flip");
        let s = SledStore::open(&dir).unwrap();
        let key = StageKey::new("stages.yaml", "infra");
        let record = AppliedRecord {
            v: FORMAT,
            version: 3,
            name: "vpc".into(),
            digest: "abc".into(),
            applied_at_ms: 5,
            run_id: 1,
            vars: Default::default(),
        };
        let mut t = Transition::new();
        t.push(Op::PutApplied {
            key: key.clone(),
            record,
        });
        let mut t2 = Transition::new();
        t2.push(run(1));
        s.commit(t).unwrap();
        s.commit(t2).unwrap();
        // One byte of the (encrypted) applied record changes: it no longer decrypts.
        let k = applied_key(&key, 3);
        let mut v = s.applied.get(&k).unwrap().unwrap().to_vec();
        let last = v.len() - 1;
        v[last] ^= 1;
        s.applied.insert(&k, v).unwrap();
        let err = s.applied(&key).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, StoreError::Damaged { .. }), "{text}");
        assert!(text.contains(&dir.display().to_string()), "{text}");
        assert!(text.contains("stage `infra`"), "{text}");
        assert!(text.contains("applied migration 3"), "{text}");
        assert!(text.contains("does not decrypt"), "{text}");
        // A digit of a (plain) run record changes: still valid JSON, caught by the checksum.
        let mut v = s.runs.get(run_key(1)).unwrap().unwrap().to_vec();
        let at = v.windows(14).position(|w| w == b"\"created_at_ms").unwrap() + 16;
        v[at] = b'7';
        s.runs.insert(run_key(1), v).unwrap();
        let text = s.run(1).unwrap_err().to_string();
        assert!(
            text.contains("run 1") && text.contains("checksum"),
            "{text}"
        );
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn lost_records_are_caught_by_the_high_water_mark() {
        let dir = temp("hwm");
        let older = temp("hwm-older");
        {
            let s = SledStore::open(&dir).unwrap();
            let mut t = Transition::new();
            t.push(run(1)).push(event(1, 0));
            s.commit(t).unwrap();
        }
        // A copy of the store as it was after run 1 (what a truncated log would hold).
        let s = reopen(&dir).unwrap();
        drop(s);
        std::fs::create_dir_all(&older).unwrap();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                std::fs::copy(entry.path(), older.join(entry.file_name())).unwrap();
            }
        }
        {
            let s = reopen(&dir).unwrap();
            let mut t = Transition::new();
            t.push(run(2)).push(event(2, 0)).push(event(2, 1));
            s.commit(t).unwrap();
        }
        // The older data with the newer mark: records were lost.
        let s = reopen(&dir).unwrap();
        drop(s);
        std::fs::copy(dir.join(HIGH_WATER), older.join(HIGH_WATER)).unwrap();
        let err = reopen(&older).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, StoreError::Damaged { .. }), "{text}");
        assert!(text.contains("records were lost"), "{text}");
        assert!(
            text.contains("runs up to 2 and 3 events were written"),
            "{text}"
        );
        assert!(text.contains("restore it from a backup"), "{text}");
        // The intact store opens.
        let s = reopen(&dir).unwrap();
        assert_eq!(s.runs().unwrap().len(), 2);
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&older);
    }

    #[test]
    fn exported_values_are_encrypted_at_rest_and_a_wrong_key_changes_nothing() {
        let dir = temp("sealed");
        let key = StageKey::new("stages.yaml", "db");
        {
            let s = SledStore::open(&dir).unwrap();
            let mut t = Transition::new();
            t.push(Op::PutResult {
                key: key.clone(),
                record: StageResultRecord {
                    v: FORMAT,
                    run_id: 1,
                    at_ms: 1,
                    exports: [("db_password".to_owned(), "s3cr3t-at-rest".to_owned())].into(),
                    secret: vec!["db_password".into()],
                },
            });
            t.push(Op::PutApplied {
                key: key.clone(),
                record: AppliedRecord {
                    v: FORMAT,
                    version: 1,
                    name: "m".into(),
                    digest: "d".into(),
                    applied_at_ms: 1,
                    run_id: 1,
                    vars: [("token".to_owned(), "tok-at-rest-42".to_owned())].into(),
                },
            });
            t.push(Op::PutSubmission {
                run: 1,
                bytes: b"set api_key=sub-secret-77".to_vec(),
            });
            s.commit(t).unwrap();
            assert_eq!(
                s.result(&key).unwrap().unwrap().exports["db_password"],
                "s3cr3t-at-rest"
            );
        }
        let s = reopen(&dir).unwrap();
        assert_eq!(s.applied(&key).unwrap()[0].vars["token"], "tok-at-rest-42");
        assert_eq!(
            s.submission(1).unwrap().unwrap(),
            b"set api_key=sub-secret-77".to_vec()
        );
        drop(s);
        let _ = reopen(&dir).map(drop);
        let raw = baton_e2e::files::all_bytes(&dir);
        for secret in [&b"s3cr3t-at-rest"[..], b"tok-at-rest-42", b"sub-secret-77"] {
            assert!(
                !raw.windows(secret.len()).any(|w| w == secret),
                "a secret is in clear in the state directory"
            );
        }
        // The key file is the owner's alone.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("state.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Another key: refused at open, nothing changed. (The key file is swapped rather than
        // BATON_STATE_KEY set: tests in this process run in parallel.)
        let key_file = dir.join("state.key");
        let original = std::fs::read(&key_file).unwrap();
        std::fs::write(&key_file, "11".repeat(32)).unwrap();
        let err = reopen(&dir).unwrap_err();
        std::fs::write(&key_file, original).unwrap();
        let text = err.to_string();
        assert!(text.contains("does not open this state"), "{text}");
        assert!(text.contains("nothing was changed"), "{text}");
        let s = reopen(&dir).unwrap();
        assert_eq!(s.applied(&key).unwrap().len(), 1);
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_path_mistake_is_not_called_damage() {
        let file = temp("file");
        std::fs::write(&file, "not a directory").unwrap();
        let err = SledStore::open(&file.join("state")).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, StoreError::Open { .. }), "{text}");
        assert!(!text.contains("backup"), "{text}");
        assert!(text.contains("check the path"), "{text}");
        let _ = std::fs::remove_file(&file);
    }
}

#[cfg(test)]
mod group_tests {
    use super::GroupFlush;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{mpsc, Arc, Mutex};
    use std::time::Duration;

    /// Waits (bounded) until `check` holds.
    fn until(what: &str, check: impl Fn() -> bool) {
        for _ in 0..1000 {
            if check() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("timed out waiting for {what}");
    }

    /// With a flush that can be held: a writer that arrives while a flush runs is not
    /// released by that flush (it may not cover its transition), only by the next one, and
    /// writers that arrive together share one flush.
    #[test]
    fn no_waiter_is_released_before_the_flush_that_covers_it() {
        let group = Arc::new(GroupFlush::default());
        let (release, held) = mpsc::channel::<()>();
        let held = Arc::new(Mutex::new(held));
        let started = Arc::new(AtomicU64::new(0));
        let completed = Arc::new(AtomicU64::new(0));
        let flush = {
            let (started, completed) = (started.clone(), completed.clone());
            move || {
                started.fetch_add(1, Ordering::SeqCst);
                held.lock().unwrap().recv().unwrap();
                completed.fetch_add(1, Ordering::SeqCst);
                Ok::<(), super::StoreError>(())
            }
        };
        // A writer: returns the number of flushes completed when it was released.
        let writer = |done: Arc<AtomicBool>| {
            let (group, flush, completed) = (group.clone(), flush.clone(), completed.clone());
            std::thread::spawn(move || {
                group.flush_after_this(&flush).unwrap();
                done.store(true, Ordering::SeqCst);
                completed.load(Ordering::SeqCst)
            })
        };
        let a_done = Arc::new(AtomicBool::new(false));
        let a = writer(a_done.clone());
        until("the first flush to start", || {
            started.load(Ordering::SeqCst) == 1
        });
        // B and C arrive while A's flush runs: it was started before their transitions.
        let (b_done, c_done) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let b = writer(b_done.clone());
        let c = writer(c_done.clone());
        until("B and C to take their tickets", || group.issued() == 3);
        assert!(
            !a_done.load(Ordering::SeqCst),
            "A returned before its flush ended"
        );
        release.send(()).unwrap();
        assert_eq!(a.join().unwrap(), 1);
        // One of B and C runs the next flush for both; neither is out before it ends.
        until("the second flush to start", || {
            started.load(Ordering::SeqCst) == 2
        });
        assert!(!b_done.load(Ordering::SeqCst) && !c_done.load(Ordering::SeqCst));
        release.send(()).unwrap();
        assert_eq!(b.join().unwrap(), 2);
        assert_eq!(c.join().unwrap(), 2);
        assert_eq!(
            started.load(Ordering::SeqCst),
            2,
            "B and C shared one flush"
        );
    }
}
