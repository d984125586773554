//! [`Stat`] packed into one allocation, for what is kept per path for long: the inode table
//! holds one for every entry the kernel looked up (an `ls -l` of a million files: a million).
//!
//! A `Stat` keeps its user metadata in a `BTreeMap` of `String`s: on a `file://` mount each file
//! records six attributes (mode, owner, group, three times), which is a map node of about 540
//! bytes and twelve small allocations, about 1 KiB of heap per file. Packed, the same attributes
//! are one allocation of their bytes (about 120 bytes), and what a packed stat costs is known
//! exactly ([`PackedStat::heap_bytes`]), which is what caps in bytes need.

use std::time::SystemTime;

use super::{Kind, Stat};
use crate::store::{UserMeta, Version};

/// A [`Stat`] whose version and user metadata are one allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedStat {
    kind: Kind,
    has_version: bool,
    has_user: bool,
    /// Length of the version at the start of `blob`.
    version_len: u32,
    size: u64,
    mtime: SystemTime,
    /// The version, then each user metadata entry as key length (`u32`, native order), key,
    /// value length, value.
    blob: Box<[u8]>,
}

impl PackedStat {
    pub fn pack(s: &Stat) -> PackedStat {
        let version = s.version.as_ref().map_or("", |v| v.0.as_str());
        let user_len: usize = s
            .user
            .iter()
            .flatten()
            .map(|(k, v)| 8 + k.len() + v.len())
            .sum();
        let mut blob = Vec::with_capacity(version.len() + user_len);
        blob.extend_from_slice(version.as_bytes());
        for (k, v) in s.user.iter().flatten() {
            for part in [k, v] {
                blob.extend_from_slice(&(part.len() as u32).to_ne_bytes());
                blob.extend_from_slice(part.as_bytes());
            }
        }
        PackedStat {
            kind: s.kind,
            has_version: s.version.is_some(),
            has_user: s.user.is_some(),
            version_len: version.len() as u32,
            size: s.size,
            mtime: s.mtime,
            blob: blob.into_boxed_slice(),
        }
    }

    pub fn unpack(&self) -> Stat {
        Stat {
            kind: self.kind,
            size: self.size,
            version: self.version().map(|v| Version(v.to_string())),
            mtime: self.mtime,
            user: self.has_user.then(|| {
                self.user_entries()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<UserMeta>()
            }),
        }
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn version(&self) -> Option<&str> {
        self.has_version
            .then(|| str_at(&self.blob[..self.version_len as usize]))
    }

    /// Changes what `f` changes: unpacks, and packs the result.
    pub fn edit(&mut self, f: impl FnOnce(&mut Stat)) {
        let mut s = self.unpack();
        f(&mut s);
        *self = PackedStat::pack(&s);
    }

    /// Bytes on the heap (the struct itself not counted).
    pub fn heap_bytes(&self) -> usize {
        self.blob.len()
    }

    fn user_entries(&self) -> impl Iterator<Item = (&str, &str)> {
        let mut rest = &self.blob[self.version_len as usize..];
        let mut next = move || {
            let (len, tail) = rest.split_first_chunk::<4>()?;
            let (part, tail) = tail.split_at(u32::from_ne_bytes(*len) as usize);
            rest = tail;
            Some(str_at(part))
        };
        std::iter::from_fn(move || Some((next()?, next()?)))
    }
}

/// The packed bytes of a string (written from a `&str` by `pack`).
fn str_at(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).expect("packed from a str")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn unpacks_what_was_packed() {
        let user: UserMeta = [("mode", "33188"), ("uid", ""), ("mtime", "1764590000.5")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_590_000);
        let stats = [
            Stat::dir(),
            Stat {
                kind: Kind::File,
                size: 7,
                version: Some(Version("v1.2".into())),
                mtime,
                user: Some(user),
            },
            Stat {
                kind: Kind::Symlink,
                size: 0,
                version: Some(Version(String::new())),
                mtime,
                user: None,
            },
        ];
        for s in stats {
            let p = PackedStat::pack(&s);
            assert_eq!(p.unpack(), s);
            assert_eq!((p.kind(), p.size()), (s.kind, s.size));
            assert_eq!(p.version(), s.version.as_ref().map(|v| v.0.as_str()));
        }
        let mut p = PackedStat::pack(&Stat::dir());
        p.edit(|s| s.size = 3);
        assert_eq!(p.unpack().size, 3);
    }
}
