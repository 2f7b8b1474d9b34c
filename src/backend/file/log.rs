//! The change log: the `file://` store's write-ahead log and the source of its watches.
//!
//! Segments `log/<first revision, 20 digits>.log` hold framed records ([`codec::frame`]) in
//! revision order. A write is committed when its record is appended and synced, under the
//! store's lock; only then are the key files changed. A full segment ends with a `Seal` record
//! naming the next segment's first revision. Segments wholly older than the last
//! `changes_kept` revisions are deleted, oldest first.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::codec::{frame, unframe, Dec, Enc};

/// A segment is sealed once it grows past this many bytes.
pub(crate) const SEGMENT_BYTES: u64 = 4 << 20;

/// One record of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// `key` now holds `value` at version `rev`, until `expires` if it has a TTL.
    Put {
        rev: u64,
        key: String,
        value: Vec<u8>,
        expires: Option<(String, i64)>,
    },
    /// `key` was deleted (or its TTL ran out) at revision `rev`.
    Delete { rev: u64, key: String },
    /// The segment ends; the log goes on in the segment that starts at revision `next`.
    Seal { next: u64 },
}

impl Change {
    pub(crate) fn rev(&self) -> Option<u64> {
        match self {
            Change::Put { rev, .. } | Change::Delete { rev, .. } => Some(*rev),
            Change::Seal { .. } => None,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        match self {
            Change::Put {
                rev,
                key,
                value,
                expires,
            } => e.u8(1).u64(*rev).str(key).bytes(value).expiry(expires),
            Change::Delete { rev, key } => e.u8(2).u64(*rev).str(key),
            Change::Seal { next } => e.u8(3).u64(*next),
        };
        e.0
    }

    fn decode(body: &[u8]) -> Option<Change> {
        let mut d = Dec::new(body);
        let c = match d.u8()? {
            1 => Change::Put {
                rev: d.u64()?,
                key: d.string()?,
                value: d.bytes()?.to_vec(),
                expires: d.expiry()?,
            },
            2 => Change::Delete {
                rev: d.u64()?,
                key: d.string()?,
            },
            3 => Change::Seal { next: d.u64()? },
            _ => return None,
        };
        d.is_empty().then_some(c)
    }
}

/// The path of the segment that starts at revision `first`.
pub(crate) fn segment_path(log_dir: &Path, first: u64) -> PathBuf {
    log_dir.join(format!("{first:020}.log"))
}

/// The first revisions of the segments in `log_dir`, in order.
pub(crate) fn segments(log_dir: &Path) -> io::Result<Vec<u64>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(log_dir)? {
        let name = e?.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = name.strip_suffix(".log").and_then(|n| n.parse().ok()) {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// What a read of the log found.
#[derive(Debug)]
pub(crate) enum Read {
    /// The changes after the cursor's position, in order (maybe none).
    Changes(Vec<Change>),
    /// The segment that comes next was deleted: the changes in it are gone.
    Gap { next: u64 },
}

/// A position in the log: a segment, an offset in it, and the last revision read.
pub(crate) struct Cursor {
    log_dir: PathBuf,
    first: u64,
    file: File,
    offset: u64,
    /// The revision of the last change read (0: none yet).
    pub(crate) rev: u64,
    /// The last put or delete read, kept so that a writer can check that it was applied.
    pub(crate) last: Option<Change>,
    writable: bool,
}

fn open_segment(path: &Path, writable: bool) -> io::Result<File> {
    OpenOptions::new().read(true).write(writable).open(path)
}

impl Cursor {
    /// A cursor at the end of the newest segment (created, starting at revision 1, if the log
    /// is empty); `writable` for the cursor that appends.
    pub(crate) fn at_end(log_dir: &Path, writable: bool) -> io::Result<Cursor> {
        let first = match segments(log_dir)?.last() {
            Some(f) => *f,
            None => {
                create_segment(log_dir, 1)?;
                1
            }
        };
        let mut c = Cursor {
            log_dir: log_dir.to_path_buf(),
            first,
            file: open_segment(&segment_path(log_dir, first), writable)?,
            offset: 0,
            rev: first.saturating_sub(1),
            last: None,
            writable,
        };
        loop {
            match c.read(usize::MAX)? {
                Read::Changes(ch) if ch.is_empty() => return Ok(c),
                Read::Changes(_) => {}
                // Pruned while being read: start again at the newest segment.
                Read::Gap { .. } => return Cursor::at_end(log_dir, writable),
            }
        }
    }

    /// Another cursor at the same position, reading only.
    pub(crate) fn reader(&self) -> io::Result<Cursor> {
        Ok(Cursor {
            log_dir: self.log_dir.clone(),
            first: self.first,
            file: open_segment(&segment_path(&self.log_dir, self.first), false)?,
            offset: self.offset,
            rev: self.rev,
            last: self.last.clone(),
            writable: false,
        })
    }

    /// Reads the complete records after the cursor, up to about `max_bytes` (at least one
    /// record), following seals into the next segment. A frame being written (or torn) ends the
    /// read before it.
    pub(crate) fn read(&mut self, max_bytes: usize) -> io::Result<Read> {
        let mut out = Vec::new();
        let mut budget = max_bytes;
        loop {
            let len = self.file.metadata()?.len();
            if len <= self.offset {
                return Ok(Read::Changes(out));
            }
            let want = usize::try_from(len - self.offset).unwrap_or(usize::MAX);
            let mut buf = vec![0; want.min(budget.max(1 << 16))];
            let n = read_full_at(&self.file, &mut buf, self.offset)?;
            buf.truncate(n);
            // A record larger than the chunk: read it whole.
            if n >= 4 && unframe(&buf).is_none() {
                let need =
                    20 + u32::from_le_bytes(buf[..4].try_into().unwrap_or_default()) as usize;
                if need > n && need <= want {
                    buf.resize(need, 0);
                    let n = read_full_at(&self.file, &mut buf, self.offset)?;
                    buf.truncate(n);
                }
            }
            let mut at = 0;
            let mut sealed = None;
            while let Some((body, used)) = unframe(&buf[at..]) {
                let Some(change) = Change::decode(body) else {
                    break;
                };
                if let Change::Seal { next } = change {
                    sealed = Some((next, at as u64));
                    break;
                }
                at += used;
                self.rev = change.rev().unwrap_or(self.rev);
                self.last = Some(change.clone());
                out.push(change);
                if at >= budget {
                    break;
                }
            }
            let base = self.offset;
            self.offset += at as u64;
            budget = budget.saturating_sub(at);
            if let Some((next, seal_at)) = sealed {
                match open_segment(&segment_path(&self.log_dir, next), self.writable) {
                    Ok(f) => {
                        self.file = f;
                        self.first = next;
                        self.offset = 0;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        // Deleted already (a newer segment exists): the changes in it are gone.
                        // Not created yet (its writer died between the seal and the create):
                        // nothing more to read until a writer creates it.
                        self.offset = base + seal_at;
                        if segments(&self.log_dir)?.iter().any(|f| *f > next) {
                            return Ok(Read::Gap { next });
                        }
                        return Ok(Read::Changes(out));
                    }
                    Err(e) => return Err(e),
                }
                if budget == 0 {
                    return Ok(Read::Changes(out));
                }
                continue;
            }
            if at == 0 || budget == 0 || at < buf.len() {
                return Ok(Read::Changes(out));
            }
        }
    }

    /// Whether bytes follow the last complete record: a torn append, for a writer (which holds
    /// the store's lock, so nobody else is appending) to cut off.
    pub(crate) fn torn(&self) -> io::Result<bool> {
        Ok(self.file.metadata()?.len() > self.offset)
    }

    /// Cuts off what follows the last complete record.
    pub(crate) fn cut_torn(&mut self) -> io::Result<()> {
        self.file.set_len(self.offset)?;
        self.file.sync_data()
    }

    /// Appends `change` and syncs it to disk: the write is committed.
    pub(crate) fn append(&mut self, change: Change) -> io::Result<()> {
        let rec = frame(&change.encode());
        self.file.write_all_at(&rec, self.offset)?;
        self.file.sync_data()?;
        self.offset += rec.len() as u64;
        if let Some(r) = change.rev() {
            self.rev = r;
            self.last = Some(change);
        }
        Ok(())
    }

    /// Seals a segment grown past `segment_bytes`, starts the next one, and deletes the
    /// segments wholly older than the last `kept` revisions.
    pub(crate) fn roll(&mut self, segment_bytes: u64, kept: u64) -> io::Result<()> {
        if self.offset < segment_bytes {
            return Ok(());
        }
        let next = self.rev + 1;
        let rec = frame(&Change::Seal { next }.encode());
        self.file.write_all_at(&rec, self.offset)?;
        self.file.sync_data()?;
        create_segment(&self.log_dir, next)?;
        self.file = open_segment(&segment_path(&self.log_dir, next), true)?;
        self.first = next;
        self.offset = 0;
        let firsts = segments(&self.log_dir)?;
        for pair in firsts.windows(2) {
            // Segment pair[0] holds revisions up to pair[1] - 1.
            if pair[1].saturating_sub(1) + kept <= self.rev {
                std::fs::remove_file(segment_path(&self.log_dir, pair[0]))?;
            }
        }
        Ok(())
    }

    /// Whether a writer finds the next segment missing after a seal (its writer died between
    /// the seal and the create): creates it.
    pub(crate) fn repair_seal(&mut self) -> io::Result<()> {
        let len = self.file.metadata()?.len();
        if len <= self.offset {
            return Ok(());
        }
        let mut buf = vec![0; usize::try_from(len - self.offset).unwrap_or(0).min(64)];
        let n = read_full_at(&self.file, &mut buf, self.offset)?;
        if let Some((body, _)) = unframe(&buf[..n]) {
            if let Some(Change::Seal { next }) = Change::decode(body) {
                create_segment(&self.log_dir, next)?;
            }
        }
        Ok(())
    }
}

fn read_full_at(f: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], offset + n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Creates the segment starting at `first` (if missing) and syncs the directory.
fn create_segment(log_dir: &Path, first: u64) -> io::Result<()> {
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(segment_path(log_dir, first))
    {
        Ok(f) => f.sync_all()?,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    File::open(log_dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(rev: u64) -> Change {
        Change::Put {
            rev,
            key: format!("k{rev}"),
            value: vec![7; 100],
            expires: None,
        }
    }

    fn changes(r: Read) -> Vec<Change> {
        match r {
            Read::Changes(c) => c,
            Read::Gap { next } => panic!("gap at {next}"),
        }
    }

    #[test]
    fn readers_follow_seals_and_see_gaps_after_pruning() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path();
        let mut w = Cursor::at_end(log, true).unwrap();
        let mut r = w.reader().unwrap();
        for rev in 1..=10 {
            w.append(put(rev)).unwrap();
            w.roll(300, 1000).unwrap();
        }
        assert!(segments(log).unwrap().len() > 2);
        let got = changes(r.read(usize::MAX).unwrap());
        assert_eq!(
            got.iter().map(|c| c.rev().unwrap()).collect::<Vec<_>>(),
            (1..=10).collect::<Vec<_>>()
        );
        // A new writer finds the end.
        let w2 = Cursor::at_end(log, true).unwrap();
        assert_eq!(w2.rev, 10);
        // A reader at revision 10 and a lagging one at 0; then prune to the last 3 revisions.
        let mut lag = Cursor {
            log_dir: log.to_path_buf(),
            first: 1,
            file: File::open(segment_path(log, 1)).unwrap(),
            offset: 0,
            rev: 0,
            last: None,
            writable: false,
        };
        // The reader that keeps up sees every change; the lagging one finds a gap.
        let mut kept_up = 0;
        for rev in 11..=20 {
            w.append(put(rev)).unwrap();
            w.roll(300, 3).unwrap();
            kept_up += changes(r.read(usize::MAX).unwrap()).len();
        }
        assert_eq!(kept_up, 10);
        // The lagging reader still has its open segment, then finds the next one gone.
        let mut seen = Vec::new();
        let gap = loop {
            match lag.read(usize::MAX).unwrap() {
                Read::Changes(c) if c.is_empty() => break None,
                Read::Changes(c) => seen.extend(c),
                Read::Gap { next } => break Some(next),
            }
        };
        assert!(gap.is_some(), "{seen:?}");
        assert!(seen.iter().all(|c| c.rev().unwrap() < gap.unwrap()));
    }

    #[test]
    fn a_torn_append_is_not_read_and_is_cut_by_the_next_writer() {
        let d = tempfile::tempdir().unwrap();
        let mut w = Cursor::at_end(d.path(), true).unwrap();
        w.append(put(1)).unwrap();
        let rec = frame(&put(2).encode());
        w.file
            .write_all_at(&rec[..rec.len() - 3], w.offset)
            .unwrap();
        let mut r = Cursor::at_end(d.path(), true).unwrap();
        assert_eq!(r.rev, 1);
        assert!(r.torn().unwrap());
        r.cut_torn().unwrap();
        r.append(put(2)).unwrap();
        let again = Cursor::at_end(d.path(), false).unwrap();
        assert_eq!(again.rev, 2);
        assert_eq!(again.last, Some(put(2)));
    }
}
