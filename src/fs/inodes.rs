//! The inode table: one inode for every (parent, name) the kernel holds, and its bound.
//!
//! ## What an inode costs
//! An inode keeps its parent, its name (shared with the name index), its attributes packed in
//! one allocation ([`PackedStat`]) and its bookkeeping; not its object key, which is its
//! parent's key and its name ([`InodeTable::key`]), so a rename re-points one inode and
//! everything below it follows. [`InodeTable::bytes`] counts each inode's struct, its heap
//! allocations and its slots in both indexes (twice: a hash table is up to half empty after it
//! grows): about 400 bytes for a file of a `file://` mount with a 10-byte name and its six
//! attributes, less for an S3 object listed without metadata.
//!
//! ## The bound
//! The kernel keeps every inode it looked up (`ls -l` of a million files: a million) until it
//! forgets them, which it does only under memory pressure, and each one it holds the daemon must
//! know. So when the table holds more than its cap (`--max-inode-memory`) the daemon asks the
//! kernel to drop the names of the least recently used inodes (`FUSE_NOTIFY_INVAL_ENTRY`, sent by
//! `fuse`), down to 90% of the cap, and the kernel answers with a `FORGET` for each inode it
//! releases. Never asked to drop: open files and directories (a directory may be a process's
//! working directory, whose path would stop resolving), the root, and inodes already asked. So the
//! table exceeds its cap only by what is in use: open files, directories, and inodes the kernel
//! has not released yet.
//!
//! A name looked up again after its inode was dropped gets a new inode number. Numbers are never
//! reused: the kernel may still hold an old one (until its `FORGET` arrives), and one number must
//! never name two objects. Until the `FORGET`, a lookup of the name gets the same inode back.
//!
//! An inode whose children are still known is kept until they are gone (they name their keys
//! through it), even once the kernel forgot it.
//!
//! ## What dropping costs
//! The inodes that may be dropped wait in a queue in the order of their last use, so a round
//! takes the oldest from its front and costs what it drops, whatever the table holds besides. A
//! scan of the whole table per round cost the same while the inodes that may be dropped were
//! most of it (`ls -l`), but when directories or open files filled the cap (`find` in a tree of
//! 100k directories), every lookup scanned them all again. A use does not move an inode in the
//! queue but queues it again; its older places are stale, skipped when they come out, and the
//! queue is rebuilt from the table when stale places outnumber the inodes.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Instant;

use super::ROOT_INO;
use crate::meta::{Kind, PackedStat, Stat};
use crate::store::Version;

/// The inodes are dropped down to this share of the cap (in tenths) once it is exceeded: each
/// round asks for a tenth of the cap at once, so the table is scanned once per that many new
/// inodes, not at each.
const DROP_TO_TENTHS: u64 = 9;

/// Bytes a heap allocation costs besides what it holds (the allocator's header and rounding).
const ALLOC_OVERHEAD: usize = 16;

pub(super) struct Inode {
    pub parent: u64,
    pub name: Arc<str>,
    pub stat: PackedStat,
    /// When `stat` was last confirmed by the store.
    pub checked: Instant,
    /// Kernel references (lookups minus forgets).
    pub lookups: u64,
    /// Version whose bytes the kernel page cache may hold (the last one opened).
    pub cached_version: Option<Version>,
    /// Known inodes whose parent this is.
    children: u32,
    /// Open handles (files and directories).
    open: u32,
    /// The table's clock at its last use, for dropping the least recently used first.
    used: u64,
    /// The kernel was asked to drop it and has not forgotten it yet.
    dropping: bool,
    /// What it costs in [`InodeTable::bytes`].
    weight: u32,
}

impl Inode {
    fn cost(&self) -> u64 {
        // Its slot in `by_ino` and in `by_name`, twice each (see the module docs), two places in
        // the queue of what may be dropped (see `InodeTable::queue`), and its heap.
        let slots = 2
            * (std::mem::size_of::<(u64, Inode)>()
                + std::mem::size_of::<(NameKey, u64)>()
                + std::mem::size_of::<(u64, u64)>());
        let heap = [
            16 + self.name.len(),
            self.stat.heap_bytes(),
            self.cached_version.as_ref().map_or(0, |v| v.0.len()),
        ]
        .iter()
        .filter(|&&n| n > 0)
        .map(|n| n + ALLOC_OVERHEAD)
        .sum::<usize>();
        (slots + heap) as u64
    }
}

/// What [`super::Fs::update_inode`] may change: an inode's attributes (unpacked) and freshness.
pub(super) struct InodeEdit {
    pub stat: Stat,
    pub checked: Instant,
    pub cached_version: Option<Version>,
}

/// (parent, name) as the name index holds it, looked up with a borrowed `(u64, &str)`.
#[derive(Clone)]
struct NameKey(u64, Arc<str>);

trait NameRef {
    fn parts(&self) -> (u64, &str);
}

impl NameRef for NameKey {
    fn parts(&self) -> (u64, &str) {
        (self.0, &self.1)
    }
}

impl NameRef for (u64, &str) {
    fn parts(&self) -> (u64, &str) {
        *self
    }
}

impl<'a> Borrow<dyn NameRef + 'a> for NameKey {
    fn borrow(&self) -> &(dyn NameRef + 'a) {
        self
    }
}

impl Hash for dyn NameRef + '_ {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.parts().hash(h)
    }
}

impl PartialEq for dyn NameRef + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn NameRef + '_ {}

impl Hash for NameKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.parts().hash(h)
    }
}

impl PartialEq for NameKey {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for NameKey {}

/// GUARDED_BY `Fs::inodes`. INVARIANT: every inode but the root has its parent in the table, and
/// `children` counts them; `bytes` is the sum of the weights, `dropping_bytes` that of the
/// inodes marked `dropping`.
pub(super) struct InodeTable {
    by_ino: HashMap<u64, Inode>,
    by_name: HashMap<NameKey, u64>,
    /// Inodes untied from their name while the kernel still uses them (found by a rename of
    /// their old name).
    detached: HashSet<u64>,
    /// Key of the mount root (`""` or ending with `/`).
    root_key: String,
    next: u64,
    clock: u64,
    bytes: u64,
    dropping_bytes: u64,
    /// `--max-inode-memory`.
    cap: u64,
    /// (last use, inode) of the inodes that may be dropped, oldest first, and stale places of
    /// inodes used again since, gone, or that may not be dropped any more (see the module docs).
    queue: VecDeque<(u64, u64)>,
    /// Places of `queue` examined, for tests of what a round costs.
    #[cfg(test)]
    examined: u64,
}

impl InodeTable {
    pub fn new(root_key: String, cap: u64) -> InodeTable {
        let mut t = InodeTable {
            by_ino: HashMap::new(),
            by_name: HashMap::new(),
            detached: HashSet::new(),
            root_key,
            next: ROOT_INO + 1,
            clock: 0,
            bytes: 0,
            dropping_bytes: 0,
            cap,
            queue: VecDeque::new(),
            #[cfg(test)]
            examined: 0,
        };
        t.insert(ROOT_INO, ROOT_INO, "".into(), &Stat::dir());
        t
    }

    pub fn get(&self, ino: u64) -> Option<&Inode> {
        self.by_ino.get(&ino)
    }

    /// How many inodes, and their bytes.
    pub fn usage(&self) -> (usize, u64) {
        (self.by_ino.len(), self.bytes)
    }

    /// Bytes of the inodes the kernel was asked to drop and has not forgotten yet: what the
    /// table may hold over its cap besides open files and directories.
    pub fn dropping_bytes(&self) -> u64 {
        self.dropping_bytes
    }

    /// The object key of `ino`: its parent's key and its name, with a `/` for a directory.
    pub fn key(&self, ino: u64) -> Option<String> {
        let mut names = Vec::new();
        let mut at = ino;
        while at != ROOT_INO {
            let i = self.by_ino.get(&at)?;
            names.push(&*i.name);
            at = i.parent;
            if names.len() > 4096 {
                return None; // a cycle: never made by a rename, which the kernel checks
            }
        }
        let mut key = self.root_key.clone();
        for name in names.iter().rev() {
            key.push_str(name);
            key.push('/');
        }
        if ino != ROOT_INO && self.by_ino.get(&ino)?.stat.kind() != Kind::Dir {
            key.pop();
        }
        Some(key)
    }

    /// The inode (parent, name) is tied to.
    pub fn by_name(&self, parent: u64, name: &str) -> Option<u64> {
        self.by_name.get(&(parent, name) as &dyn NameRef).copied()
    }

    /// Unties (parent, name) from its inode (the name went away); the inode lives on until the
    /// kernel forgets it.
    pub fn untie_name(&mut self, parent: u64, name: &str) -> Option<u64> {
        let ino = self.by_name.remove(&(parent, name) as &dyn NameRef)?;
        self.detached.insert(ino);
        Some(ino)
    }

    /// Unties `ino` from its name, if it still has it.
    pub fn detach(&mut self, ino: u64) {
        let Some(i) = self.by_ino.get(&ino) else {
            return;
        };
        let name = i.name.clone();
        if self.by_name(i.parent, &name) == Some(ino) {
            self.untie_name(i.parent, &name);
        }
    }

    fn insert(&mut self, ino: u64, parent: u64, name: Arc<str>, stat: &Stat) {
        let mut inode = Inode {
            parent,
            name: name.clone(),
            stat: PackedStat::pack(stat),
            checked: Instant::now(),
            lookups: 1,
            cached_version: None,
            children: 0,
            open: 0,
            used: self.clock,
            dropping: false,
            weight: 0,
        };
        inode.weight = inode.cost().try_into().unwrap_or(u32::MAX);
        self.bytes += inode.weight as u64;
        self.by_ino.insert(ino, inode);
        self.enqueue(ino);
        if ino != ROOT_INO {
            if let Some(p) = self.by_ino.get_mut(&parent) {
                p.children += 1;
            }
            if let Some(old) = self.by_name.insert(NameKey(parent, name), ino) {
                self.detached.insert(old);
            }
        }
    }

    /// Records a kernel reference to (parent, name) with `stat`: the inode it has, or a new one
    /// (also when the kind changed: one inode number never changes kind).
    pub fn remember(&mut self, parent: u64, name: &str, stat: &Stat) -> u64 {
        self.clock += 1;
        let existing = self
            .by_name(parent, name)
            .filter(|ino| self.by_ino[ino].stat.kind() == stat.kind);
        if let Some(ino) = existing {
            let clock = self.clock;
            self.edit(ino, |i| {
                i.lookups += 1;
                i.used = clock;
                i.dropping = false;
                i.stat = PackedStat::pack(stat);
                i.checked = Instant::now();
            });
            self.enqueue(ino);
            return ino;
        }
        let ino = self.next;
        self.next += 1;
        self.insert(ino, parent, name.into(), stat);
        ino
    }

    /// Applies `f` to `ino`, keeping the byte counts right.
    fn edit(&mut self, ino: u64, f: impl FnOnce(&mut Inode)) {
        let Some(i) = self.by_ino.get_mut(&ino) else {
            return;
        };
        let (old_weight, was_dropping) = (i.weight as u64, i.dropping);
        f(i);
        i.weight = i.cost().try_into().unwrap_or(u32::MAX);
        self.bytes = self.bytes - old_weight + i.weight as u64;
        if was_dropping {
            self.dropping_bytes -= old_weight;
        }
        if i.dropping {
            self.dropping_bytes += i.weight as u64;
        }
    }

    /// Changes the attributes or freshness of `ino`.
    pub fn update(&mut self, ino: u64, f: impl FnOnce(&mut InodeEdit)) {
        self.edit(ino, |i| {
            let mut e = InodeEdit {
                stat: i.stat.unpack(),
                checked: i.checked,
                cached_version: i.cached_version.take(),
            };
            f(&mut e);
            i.stat = PackedStat::pack(&e.stat);
            i.checked = e.checked;
            i.cached_version = e.cached_version;
        });
    }

    /// `ino` was used (a `getattr`): the last to be dropped.
    pub fn touch(&mut self, ino: u64) {
        self.clock += 1;
        if let Some(i) = self.by_ino.get_mut(&ino) {
            i.used = self.clock;
            self.enqueue(ino);
        }
    }

    /// Whether `i`, the inode `ino`, may be asked to be dropped (see the module docs).
    fn may_drop(ino: u64, i: &Inode) -> bool {
        ino != ROOT_INO && i.lookups > 0 && i.open == 0 && !i.dropping && i.stat.kind() != Kind::Dir
    }

    /// Queues `ino` at its last use, if it may be dropped; rebuilds the queue from the table when
    /// stale places outnumber the inodes (so the queue costs at most two places per inode).
    fn enqueue(&mut self, ino: u64) {
        let Some(i) = self.by_ino.get(&ino) else {
            return;
        };
        if !Self::may_drop(ino, i) {
            return;
        }
        self.queue.push_back((i.used, ino));
        if self.queue.len() > 2 * self.by_ino.len() + 64 {
            let mut live: Vec<(u64, u64)> = self
                .by_ino
                .iter()
                .filter(|(ino, i)| Self::may_drop(**ino, i))
                .map(|(ino, i)| (i.used, *ino))
                .collect();
            live.sort_unstable();
            self.queue = live.into();
        }
    }

    pub fn opened(&mut self, ino: u64) {
        if let Some(i) = self.by_ino.get_mut(&ino) {
            i.open += 1;
        }
    }

    /// A handle of `ino` was closed: used now, and to be dropped again once none is open.
    pub fn closed(&mut self, ino: u64) {
        self.clock += 1;
        if let Some(i) = self.by_ino.get_mut(&ino) {
            i.open = i.open.saturating_sub(1);
            i.used = self.clock;
            self.enqueue(ino);
        }
    }

    /// The kernel dropped `nlookup` references to `ino`.
    pub fn forget(&mut self, ino: u64, nlookup: u64) {
        if ino == ROOT_INO {
            return;
        }
        let Some(i) = self.by_ino.get_mut(&ino) else {
            return;
        };
        i.lookups = i.lookups.saturating_sub(nlookup);
        self.remove_if_unused(ino);
    }

    /// Removes `ino` if the kernel holds no reference to it and no known inode is below it, and
    /// then its parent if that leaves the parent unused too.
    fn remove_if_unused(&mut self, mut ino: u64) {
        while ino != ROOT_INO {
            match self.by_ino.get(&ino) {
                Some(i) if i.lookups == 0 && i.children == 0 => {}
                _ => return,
            }
            let i = self.by_ino.remove(&ino).expect("just found");
            self.bytes -= i.weight as u64;
            if i.dropping {
                self.dropping_bytes -= i.weight as u64;
            }
            if self.by_name(i.parent, &i.name) == Some(ino) {
                self.by_name.remove(&(i.parent, &*i.name) as &dyn NameRef);
            }
            self.detached.remove(&ino);
            let Some(p) = self.by_ino.get_mut(&i.parent) else {
                return;
            };
            p.children -= 1;
            ino = i.parent;
        }
    }

    /// Re-points the inode of (parent, name), and any inode untied from that name, at
    /// (new_parent, new_name); what is below a directory follows, its keys being made from its
    /// parents'. The inode that had the new name is untied from it.
    pub fn rename(&mut self, parent: u64, name: &str, new_parent: u64, new_name: &str) {
        if let Some(old) = self.by_name.remove(&(new_parent, new_name) as &dyn NameRef) {
            self.detached.insert(old);
        }
        let new_name: Arc<str> = new_name.into();
        let linked = self.by_name.remove(&(parent, name) as &dyn NameRef);
        let untied = self.detached.iter().copied().filter(|ino| {
            Some(*ino) != linked
                && self
                    .by_ino
                    .get(ino)
                    .is_some_and(|i| i.parent == parent && &*i.name == name)
        });
        let moved: Vec<u64> = linked
            .into_iter()
            .chain(untied.collect::<Vec<_>>())
            .collect();
        for ino in moved {
            self.edit(ino, |i| {
                i.parent = new_parent;
                i.name = new_name.clone();
            });
            if let Some(p) = self.by_ino.get_mut(&new_parent) {
                p.children += 1;
            }
            if let Some(p) = self.by_ino.get_mut(&parent) {
                p.children -= 1;
            }
            self.remove_if_unused(parent);
        }
        if let Some(ino) = linked {
            self.by_name.insert(NameKey(new_parent, new_name), ino);
        }
    }

    /// When the table is over its cap: the names of the least recently used inodes that may be
    /// dropped (see the module docs), enough to bring it down to 90% of the cap, marked as
    /// being dropped. Empty while under the cap.
    pub fn shed(&mut self) -> Vec<(u64, Arc<str>)> {
        let held = self.bytes - self.dropping_bytes;
        if held <= self.cap {
            return Vec::new();
        }
        let mut need = held - self.cap / 10 * DROP_TO_TENTHS;
        let mut out = Vec::new();
        while need > 0 {
            let Some((used, ino)) = self.queue.pop_front() else {
                break;
            };
            #[cfg(test)]
            {
                self.examined += 1;
            }
            let Some(i) = self.by_ino.get_mut(&ino) else {
                continue;
            };
            if i.used != used || !Self::may_drop(ino, i) {
                continue; // stale: queued again later, gone, open, or being dropped
            }
            i.dropping = true;
            self.dropping_bytes += i.weight as u64;
            need = need.saturating_sub(i.weight as u64);
            out.push((i.parent, i.name.clone()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> Stat {
        Stat {
            kind: Kind::File,
            ..Stat::dir()
        }
    }

    #[test]
    fn keys_follow_parents_through_renames() {
        let mut t = InodeTable::new("pre/".into(), u64::MAX);
        let d = t.remember(ROOT_INO, "d", &Stat::dir());
        let f = t.remember(d, "f", &file());
        assert_eq!(t.key(d).unwrap(), "pre/d/");
        assert_eq!(t.key(f).unwrap(), "pre/d/f");
        assert_eq!(t.key(ROOT_INO).unwrap(), "pre/");
        t.rename(ROOT_INO, "d", ROOT_INO, "e");
        assert_eq!(t.key(f).unwrap(), "pre/e/f");
        assert_eq!(t.by_name(ROOT_INO, "e"), Some(d));
        assert_eq!(t.by_name(ROOT_INO, "d"), None);
        // The parent outlives a forget while its child is known, and goes with the child.
        t.forget(d, 1);
        assert_eq!(t.key(f).unwrap(), "pre/e/f");
        let before = t.usage();
        t.forget(f, 1);
        assert_eq!(t.usage().0, 1, "only the root is left");
        assert!(t.usage().1 < before.1);
        assert_eq!(t.usage().1, t.by_ino[&ROOT_INO].weight as u64);
    }

    /// Directories (never dropped) filling the cap: each lookup of a file over it costs what it
    /// drops, not a look at every directory.
    #[test]
    fn a_round_costs_what_it_drops_not_what_the_table_holds() {
        let mut t = InodeTable::new(String::new(), u64::MAX);
        let dirs: Vec<u64> = (0..5000)
            .map(|n| t.remember(ROOT_INO, &format!("d{n:05}"), &Stat::dir()))
            .collect();
        t.cap = t.bytes;
        let mut dropped = 0;
        for n in 0..2000 {
            t.touch(dirs[n % 5000]);
            t.remember(dirs[n % 100], "f", &file());
            for (p, name) in t.shed() {
                dropped += 1;
                let ino = t.by_name(p, &name).unwrap();
                t.forget(ino, 1);
            }
        }
        assert!(dropped >= 1990, "all but the last few files: {dropped}");
        assert!(t.examined <= 2 * 2000, "{} places examined", t.examined);
        assert_eq!(t.usage().0, 5001 + 2000 - dropped);
    }

    #[test]
    fn over_its_cap_the_least_recently_used_files_are_dropped() {
        let mut t = InodeTable::new(String::new(), u64::MAX);
        let d = t.remember(ROOT_INO, "d", &Stat::dir());
        let files: Vec<u64> = (0..100)
            .map(|n| t.remember(d, &format!("f{n:03}"), &file()))
            .collect();
        let per_file = t.by_ino[&files[0]].weight as u64;
        t.opened(files[0]);
        t.touch(files[1]);
        t.cap = t.bytes - 50 * per_file;
        let dropped = t.shed();
        // Down to 90% of the cap: 50 over it, and a tenth of the cap more.
        let want = (50 * per_file + t.cap / 10).div_ceil(per_file);
        assert!(dropped.len() as u64 >= want - 1 && dropped.len() as u64 <= want + 1);
        let names: Vec<&str> = dropped.iter().map(|(_, n)| &**n).collect();
        assert_eq!(
            names[0], "f002",
            "oldest first; f000 is open, f001 was used since"
        );
        assert!(dropped.iter().all(|(p, _)| *p == d), "never the directory");
        assert!(t.shed().is_empty(), "asked once until forgotten");
        // A lookup of a name being dropped keeps it.
        t.remember(d, "f002", &file());
        for (_, name) in &dropped[1..] {
            let ino = t.by_name(d, name).unwrap();
            t.forget(ino, 1);
        }
        assert!(t.bytes <= t.cap);
        assert_eq!(t.dropping_bytes, 0);
        assert!(t.get(files[2]).is_some());
    }
}
