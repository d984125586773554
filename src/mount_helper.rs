//! `mount -t fuse.bucketfs SOURCE DIR -o OPTIONS` and `/etc/fstab`: the `mount(8)` helper
//! convention turned into a `bucketfs mount` command line.
//!
//! `mount(8)` runs `/sbin/mount.fuse.bucketfs SOURCE DIR [-sfnv] [-o OPTIONS]` when that file
//! exists (a symlink to `bucketfs`); otherwise fuse3's `mount.fuse` runs
//! `bucketfs SOURCE DIR -o OPTIONS` from `PATH`. Both forms land here: a program name starting
//! with `mount.`, or a first argument that is a source URL rather than a subcommand.
//!
//! Each option of the comma-separated list becomes a flag: `ro` is `--read-only`,
//! `name=value` is `--name=value` and `name` is `--name`, with `_` read as `-`
//! (`cache_dir=/var/cache/b` is `--cache-dir=/var/cache/b`, `allow_other` is
//! `--allow-other`). The options that are for `mount(8)`, systemd or the kernel's defaults
//! rather than for bucketfs (`rw`, `defaults`, `_netdev`, `noauto`, `nofail`, `x-*`, ...) are
//! dropped. An unknown option is refused like an unknown flag (exit code 2). The mount runs in
//! the background, as `mount(8)` expects of a helper.

use std::ffi::OsString;

/// What the helper was asked to do.
#[derive(Debug, PartialEq, Eq)]
pub enum HelperCall {
    /// Not called as a mount helper: the arguments as given.
    NotHelper(Vec<OsString>),
    /// The `bucketfs mount ...` command line to run.
    Mount(Vec<OsString>),
    /// `-f` ("fake"): `mount(8)` asks for everything but the mount itself.
    Fake,
}

/// Options that concern `mount(8)`, systemd or the kernel's defaults, not bucketfs.
const IGNORED: &[&str] = &[
    "rw",
    "defaults",
    "auto",
    "noauto",
    "_netdev",
    "nofail",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "nodiratime",
    "diratime",
    "async",
    "sync",
    "loud",
    "silent",
];

/// Recognises the helper forms of `argv` (program name included) and translates them.
pub fn translate(argv: Vec<OsString>) -> Result<HelperCall, String> {
    let program = argv
        .first()
        .and_then(|p| std::path::Path::new(p).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let by_name = program.starts_with("mount.");
    let by_url = argv
        .get(1)
        .is_some_and(|a| a.to_string_lossy().contains("://"));
    if !by_name && !by_url {
        return Ok(HelperCall::NotHelper(argv));
    }
    let mut positional = Vec::new();
    let mut flags: Vec<OsString> = Vec::new();
    let mut rest = argv.into_iter().skip(1);
    while let Some(arg) = rest.next() {
        let text = arg.to_string_lossy().into_owned();
        if text == "-o" {
            let list = rest
                .next()
                .ok_or("-o needs a list of options")?
                .to_string_lossy()
                .into_owned();
            flags.extend(options_to_flags(&list));
        } else if let Some(list) = text.strip_prefix("-o") {
            flags.extend(options_to_flags(list));
        } else if text == "-t" {
            rest.next(); // the type: fuse.bucketfs
        } else if text.starts_with('-') && text.len() > 1 && !text.starts_with("--") {
            // Short flags of the helper convention: -s (sloppy), -n (no mtab), -v (verbose)
            // change nothing here; -f (fake) mounts nothing.
            if text.contains('f') {
                return Ok(HelperCall::Fake);
            }
        } else if text.starts_with("--") {
            flags.push(arg); // a bucketfs flag given after the helper arguments
        } else {
            positional.push(arg);
        }
    }
    if positional.len() != 2 {
        return Err(format!(
            "a mount helper takes SOURCE and MOUNTPOINT, got {} argument(s)",
            positional.len()
        ));
    }
    let mut out: Vec<OsString> = vec!["bucketfs".into(), "mount".into()];
    out.extend(positional);
    out.extend(flags);
    Ok(HelperCall::Mount(out))
}

/// `ro,allow_other,cache_dir=/x` -> `--read-only --allow-other --cache-dir=/x`.
fn options_to_flags(list: &str) -> Vec<OsString> {
    list.split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .filter(|o| {
            let name = o.split('=').next().unwrap_or(o);
            !IGNORED.contains(&name) && !name.starts_with("x-") && name != "comment"
        })
        .map(|o| match o.split_once('=') {
            _ if o == "ro" => "--read-only".into(),
            Some((name, value)) => format!("--{}={value}", name.replace('_', "-")).into(),
            None => format!("--{}", o.replace('_', "-")).into(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn mount_helper_options_become_flags() {
        let call = translate(args(&[
            "/sbin/mount.fuse.bucketfs",
            "s3://b/models",
            "/mnt/m",
            "-o",
            "rw,ro,_netdev,noauto,x-systemd.automount,allow_other,cache_dir=/var/cache/b,uid=1000",
        ]))
        .unwrap();
        assert_eq!(
            call,
            HelperCall::Mount(args(&[
                "bucketfs",
                "mount",
                "s3://b/models",
                "/mnt/m",
                "--read-only",
                "--allow-other",
                "--cache-dir=/var/cache/b",
                "--uid=1000",
            ]))
        );
        // mount.fuse's form: `bucketfs SOURCE DIR -o OPTIONS`.
        let call = translate(args(&["bucketfs", "file:///srv", "/mnt/x", "-oro", "-n"])).unwrap();
        assert_eq!(
            call,
            HelperCall::Mount(args(&[
                "bucketfs",
                "mount",
                "file:///srv",
                "/mnt/x",
                "--read-only"
            ]))
        );
        assert_eq!(
            translate(args(&["mount.bucketfs", "s3://b", "/m", "-f"])).unwrap(),
            HelperCall::Fake
        );
        assert!(translate(args(&["mount.bucketfs", "s3://b"])).is_err());
    }

    #[test]
    fn subcommands_are_left_alone() {
        let argv = args(&["bucketfs", "mount", "s3://b", "/m"]);
        assert_eq!(
            translate(argv.clone()).unwrap(),
            HelperCall::NotHelper(argv)
        );
    }
}
