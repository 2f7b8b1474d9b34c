//! The byte layout of the `file://` backend's files: little-endian integers, length-prefixed
//! strings and byte strings, and an MD5 checksum that tells a complete record or file from a
//! torn or damaged one.

use md5::{Digest, Md5};

/// Builds a record.
#[derive(Default)]
pub(crate) struct Enc(pub(crate) Vec<u8>);

impl Enc {
    pub(crate) fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(crate) fn i64(&mut self, v: i64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(crate) fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u64(v.len() as u64);
        self.0.extend_from_slice(v);
        self
    }
    pub(crate) fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }
    /// An optional expiry: the boot id and the host clock milliseconds.
    pub(crate) fn expiry(&mut self, v: &Option<(String, i64)>) -> &mut Self {
        match v {
            None => self.u8(0),
            Some((boot, at)) => self.u8(1).str(boot).i64(*at),
        }
    }
}

/// Reads a record; every read gives `None` past the end or on a malformed field.
pub(crate) struct Dec<'a> {
    buf: &'a [u8],
}

impl<'a> Dec<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Dec { buf }
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Some(a)
    }
    pub(crate) fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    pub(crate) fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    pub(crate) fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    pub(crate) fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.u64()?).ok()?;
        self.take(n)
    }
    pub(crate) fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }
    pub(crate) fn expiry(&mut self) -> Option<Option<(String, i64)>> {
        match self.u8()? {
            0 => Some(None),
            1 => Some(Some((self.string()?, self.i64()?))),
            _ => None,
        }
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

fn digest(parts: &[&[u8]]) -> [u8; 16] {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// The 32 hex digits of the MD5 of `name`: the file name of the bucket that holds it.
pub(crate) fn bucket_name(name: &str) -> String {
    digest(&[name.as_bytes()])
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A whole file: `magic`, the body, and the checksum of both.
pub(crate) fn seal_file(magic: &[u8; 4], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 20);
    out.extend_from_slice(magic);
    out.extend_from_slice(body);
    out.extend_from_slice(&digest(&[magic, body]));
    out
}

/// The body of a file written by [`seal_file`], or `None` when the magic or checksum is wrong.
pub(crate) fn open_file<'a>(magic: &[u8; 4], file: &'a [u8]) -> Option<&'a [u8]> {
    if file.len() < 20 || &file[..4] != magic {
        return None;
    }
    let (rest, sum) = file.split_at(file.len() - 16);
    (digest(&[rest]) == sum).then_some(&rest[4..])
}

/// A log frame: the body's length (u32), its checksum, the body.
pub(crate) fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 20);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&digest(&[body]));
    out.extend_from_slice(body);
    out
}

/// The first complete frame of `buf`: its body and its length, or `None` when `buf` holds no
/// complete frame with a matching checksum (a frame still being written, or a torn one).
pub(crate) fn unframe(buf: &[u8]) -> Option<(&[u8], usize)> {
    if buf.len() < 20 {
        return None;
    }
    let n = u32::from_le_bytes(buf[..4].try_into().ok()?) as usize;
    let end = 20usize.checked_add(n)?;
    if buf.len() < end {
        return None;
    }
    let body = &buf[20..end];
    (digest(&[body]) == buf[4..20]).then_some((body, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_and_frames_round_trip_and_detect_damage() {
        let mut e = Enc::default();
        e.str("k").bytes(b"v").expiry(&Some(("b".into(), 7))).u64(9);
        let f = seal_file(b"TEST", &e.0);
        let body = open_file(b"TEST", &f).unwrap();
        let mut d = Dec::new(body);
        assert_eq!(d.string().as_deref(), Some("k"));
        assert_eq!(d.bytes(), Some(&b"v"[..]));
        assert_eq!(d.expiry(), Some(Some(("b".into(), 7))));
        assert_eq!(d.u64(), Some(9));
        assert!(d.is_empty());
        let mut bad = f.clone();
        bad[5] ^= 1;
        assert!(open_file(b"TEST", &bad).is_none());
        assert!(open_file(b"OTHR", &f).is_none());
        let fr = frame(b"hello");
        assert_eq!(unframe(&fr), Some((&b"hello"[..], fr.len())));
        assert!(unframe(&fr[..fr.len() - 1]).is_none());
        let mut torn = fr.clone();
        torn[22] ^= 1;
        assert!(unframe(&torn).is_none());
        // A length that runs past the end is incomplete, whatever it says.
        let mut huge = fr.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(unframe(&huge).is_none());
        assert_eq!(bucket_name("a").len(), 32);
    }
}
