//! File attributes in user metadata, in the names s3fs reads and writes.
//!
//! s3fs keeps a file's attributes in its object's user metadata: `mode` (the whole `st_mode` in
//! decimal, file type bits included), `uid`, `gid`, `mtime`, `atime`, `ctime` (seconds since the
//! epoch, with an optional `.nanoseconds` part) and `rdev` for device nodes; on S3 they travel as
//! `x-amz-meta-mode` and so on, on GCS as custom metadata of the same names. A symbolic link is an
//! object whose body is the link target and whose `mode` says `S_IFLNK`; a FIFO, socket or device
//! node is an empty object whose `mode` says which. Many buckets in the wild were written this
//! way, so bucketfs reads and writes the same names: a bucket stays usable by both tools. An
//! object without them (written by anything else) shows the mount's defaults.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::UserMeta;

pub const MODE: &str = "mode";
pub const UID: &str = "uid";
pub const GID: &str = "gid";
pub const MTIME: &str = "mtime";
pub const ATIME: &str = "atime";
pub const CTIME: &str = "ctime";
pub const RDEV: &str = "rdev";

/// The attributes one object's metadata records; `None` for each one it does not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileAttrs {
    /// `st_mode`: file type and permission bits.
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mtime: Option<SystemTime>,
    pub atime: Option<SystemTime>,
    pub ctime: Option<SystemTime>,
    pub rdev: Option<u32>,
}

impl FileAttrs {
    /// Reads the attributes in `meta`; a value that does not parse counts as absent.
    pub fn from_meta(meta: &UserMeta) -> FileAttrs {
        let num = |k: &str| meta.get(k).and_then(|v| v.trim().parse::<u32>().ok());
        let time = |k: &str| meta.get(k).and_then(|v| parse_time(v));
        FileAttrs {
            mode: num(MODE),
            uid: num(UID),
            gid: num(GID),
            mtime: time(MTIME),
            atime: time(ATIME),
            ctime: time(CTIME),
            rdev: num(RDEV),
        }
    }

    /// Writes the attributes that are set into `meta`, leaving its other entries alone.
    pub fn write_to(&self, meta: &mut UserMeta) {
        let mut set = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                meta.insert(k.to_string(), v);
            }
        };
        set(MODE, self.mode.map(|v| v.to_string()));
        set(UID, self.uid.map(|v| v.to_string()));
        set(GID, self.gid.map(|v| v.to_string()));
        set(MTIME, self.mtime.map(format_time));
        set(ATIME, self.atime.map(format_time));
        set(CTIME, self.ctime.map(format_time));
        set(RDEV, self.rdev.map(|v| v.to_string()));
    }

    pub fn to_meta(&self) -> UserMeta {
        let mut m = UserMeta::new();
        self.write_to(&mut m);
        m
    }

    /// The file type bits of `mode` (`libc::S_IFMT`), if a mode is recorded.
    pub fn file_type(&self) -> Option<u32> {
        self.mode.map(|m| m & libc::S_IFMT)
    }
}

/// Records a change of the content at `now` (modification and change time), in metadata that
/// records attributes at all.
pub fn touch(meta: &mut UserMeta, now: SystemTime) {
    if !meta.is_empty() {
        meta.insert(MTIME.to_string(), format_time(now));
        meta.insert(CTIME.to_string(), format_time(now));
    }
}

/// Seconds since the epoch, with `.nanoseconds` (nine digits) when there are any.
pub fn format_time(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    if d.subsec_nanos() == 0 {
        d.as_secs().to_string()
    } else {
        format!("{}.{:09}", d.as_secs(), d.subsec_nanos())
    }
}

/// Parses `format_time`'s output (and plain seconds, as older s3fs versions write).
pub fn parse_time(text: &str) -> Option<SystemTime> {
    let text = text.trim();
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    let secs: u64 = secs.parse().ok()?;
    let nanos = if frac.is_empty() {
        0
    } else {
        if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        format!("{frac:0<9}").parse::<u32>().ok()?
    };
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attrs_round_trip_through_metadata() {
        let a = FileAttrs {
            mode: Some(libc::S_IFREG | 0o4755),
            uid: Some(1000),
            gid: Some(0),
            mtime: Some(UNIX_EPOCH + Duration::new(1_700_000_000, 5)),
            atime: Some(UNIX_EPOCH + Duration::from_secs(7)),
            ctime: None,
            rdev: None,
        };
        let m = a.to_meta();
        assert_eq!(m[MODE], (libc::S_IFREG | 0o4755).to_string());
        assert_eq!(m[MTIME], "1700000000.000000005");
        assert_eq!(m[ATIME], "7");
        assert!(!m.contains_key(CTIME));
        assert_eq!(FileAttrs::from_meta(&m), a);
        assert_eq!(
            parse_time("12.5"),
            Some(UNIX_EPOCH + Duration::new(12, 500_000_000))
        );
        assert_eq!(parse_time("x"), None);
        let mut bad = UserMeta::new();
        bad.insert(MODE.into(), "rwx".into());
        assert_eq!(FileAttrs::from_meta(&bad).mode, None);
    }
}
