//! One validated configuration, built from the command line (and `BUCKETFS_*` variables).
//!
//! Everything that can be wrong with the user's input is found here, before anything touches
//! the network or the mount point, and said in one line that tells what to do.

use std::path::PathBuf;
use std::time::Duration;

/// Where the bytes live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// `s3://bucket[/prefix]`
    S3 { bucket: String, prefix: String },
    /// `gs://bucket[/prefix]`: Google Cloud Storage.
    Gcs { bucket: String, prefix: String },
    /// `file:///path/to/dir`: a local directory used as a bucket.
    Local { root: PathBuf },
}

impl Source {
    /// Parses a SOURCE argument. The prefix is normalised to end with `/` (or be empty), so
    /// `s3://b/models` and `s3://b/models/` mount the same thing.
    pub fn parse(url: &str) -> Result<Source, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("{url:?} is not a source URL; use {KINDS}"))?;
        match scheme {
            "s3" => {
                let (bucket, prefix) = bucket_and_prefix(url, scheme, rest)?;
                Ok(Source::S3 { bucket, prefix })
            }
            "gs" => {
                let (bucket, prefix) = bucket_and_prefix(url, scheme, rest)?;
                Ok(Source::Gcs { bucket, prefix })
            }
            "file" => {
                if !rest.starts_with('/') {
                    return Err(format!(
                        "{url:?} must name an absolute path: file:///PATH (three slashes)"
                    ));
                }
                Ok(Source::Local {
                    root: PathBuf::from(rest),
                })
            }
            other => Err(format!(
                "unsupported scheme {other:?} in {url:?}; use {KINDS}"
            )),
        }
    }

    /// This source narrowed to `sub` (`--prefix`), joined with the URL's own path as mount-s3
    /// joins its `--prefix`: `s3://b/models` with `llama/` is `s3://b/models/llama/`; for
    /// `file://` it is a subdirectory.
    pub fn with_prefix(&self, sub: &str) -> Result<Source, String> {
        let sub = normalize_prefix(sub.trim_start_matches('/'))
            .map_err(|e| format!("--prefix {sub:?}: {e}"))?;
        if sub.is_empty() {
            return Ok(self.clone());
        }
        Ok(match self {
            Source::S3 { bucket, prefix } => Source::S3 {
                bucket: bucket.clone(),
                prefix: format!("{prefix}{sub}"),
            },
            Source::Gcs { bucket, prefix } => Source::Gcs {
                bucket: bucket.clone(),
                prefix: format!("{prefix}{sub}"),
            },
            Source::Local { root } => Source::Local {
                root: root.join(sub.trim_end_matches('/')),
            },
        })
    }

    /// The URL of this source, as `parse` reads it back.
    pub fn url(&self) -> String {
        match self {
            Source::S3 { bucket, prefix } => format!("s3://{bucket}/{prefix}"),
            Source::Gcs { bucket, prefix } => format!("gs://{bucket}/{prefix}"),
            Source::Local { root } => format!("file://{}", root.display()),
        }
    }

    /// The key prefix every path of the mount lives under (`""` or ending with `/`).
    pub fn prefix(&self) -> &str {
        match self {
            Source::S3 { prefix, .. } | Source::Gcs { prefix, .. } => prefix,
            Source::Local { .. } => "",
        }
    }
}

/// The sources bucketfs mounts, as error messages list them.
const KINDS: &str = "s3://BUCKET[/PREFIX], gs://BUCKET[/PREFIX] or file:///PATH";

/// `BUCKET[/PREFIX]` after `scheme://`, checked; the prefix normalised.
fn bucket_and_prefix(url: &str, scheme: &str, rest: &str) -> Result<(String, String), String> {
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(format!(
            "{url:?} names no bucket; use {scheme}://BUCKET[/PREFIX]"
        ));
    }
    if !bucket
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._".contains(c))
    {
        return Err(format!(
            "{bucket:?} is not a valid bucket name (lowercase letters, digits, '-', '.', '_')"
        ));
    }
    Ok((bucket.to_string(), normalize_prefix(prefix)?))
}

/// `a/b` -> `a/b/`; `` -> ``; refuses prefixes that no file name could be built on.
fn normalize_prefix(prefix: &str) -> Result<String, String> {
    let trimmed = prefix.trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    if trimmed
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(format!(
            "prefix {prefix:?} has an empty, '.' or '..' segment; no directory can be mounted there"
        ));
    }
    Ok(format!("{trimmed}/"))
}

/// Default `--negative-metadata-ttl` (or `--metadata-ttl` if shorter). Short, because a
/// remembered "no such file" is what a user notices (a file just written by another machine is
/// missing here), yet long enough to absorb the bursts of lookups of absent names that program
/// start-ups make (module search paths, optional config files).
pub const DEFAULT_NEGATIVE_METADATA_TTL: Duration = Duration::from_secs(1);

/// `--profile`: one word that sets the options suited to a kind of job. Each setting is an
/// option of `bucketfs mount`, applied unless that option is given (on the command line or in
/// its `BUCKETFS_*` variable), so a profile is a set of defaults, never a constraint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    Serving,
    Training,
    Checkpointing,
}

impl Profile {
    pub const ALL: [Profile; 3] = [Profile::Serving, Profile::Training, Profile::Checkpointing];

    pub fn name(self) -> &'static str {
        match self {
            Profile::Serving => "serving",
            Profile::Training => "training",
            Profile::Checkpointing => "checkpointing",
        }
    }

    /// The options this profile sets, as `(long option, value)`.
    pub fn settings(self) -> &'static [(&'static str, &'static str)] {
        match self {
            // A published model version never changes, so its metadata is kept for an hour;
            // model loaders probe for optional files (tokenizer extras, adapters) that mostly do
            // not exist, so "no such file" is kept for a minute; weights are read start to end,
            // so more ranged GETs in flight fill a fast network.
            Profile::Serving => &[
                ("metadata-ttl", "1h"),
                ("negative-metadata-ttl", "1m"),
                ("read-concurrency", "16"),
            ],
            // A dataset is fixed for the length of a job and is read again every epoch: its
            // metadata and listings are kept for an hour, and the disk cache may take most of
            // its disk so later epochs read locally.
            Profile::Training => &[
                ("metadata-ttl", "1h"),
                ("negative-metadata-ttl", "1h"),
                ("cache-max-size", "80%"),
            ],
            // A resumed job must see the checkpoint another replica has just written, so
            // metadata is re-checked after a second and absence is never cached; checkpoints
            // are large, so parts are 64MiB (objects up to 640GiB in 10,000 parts); a job
            // restarted after a crash finds its predecessor's write lock alive until the lease
            // (30s by default) runs out, so writes wait 35s for it instead of failing with
            // EBUSY.
            Profile::Checkpointing => &[
                ("metadata-ttl", "1s"),
                ("negative-metadata-ttl", "0s"),
                ("write-part-size", "64MiB"),
                ("lock-wait", "35s"),
            ],
        }
    }

    /// What the profile is for, in a few words (for `--help`).
    pub fn purpose(self) -> &'static str {
        match self {
            Profile::Serving => "loading a model that does not change, by many replicas",
            Profile::Training => "reading a dataset again every epoch",
            Profile::Checkpointing => "writing large checkpoints and resuming from the latest",
        }
    }

    /// The settings as the command line spells them, e.g. `--metadata-ttl=1h ...`.
    pub fn flags(self) -> Vec<String> {
        self.settings()
            .iter()
            .map(|(opt, value)| format!("--{opt}={value}"))
            .collect()
    }
}

impl clap::ValueEnum for Profile {
    fn value_variants<'a>() -> &'a [Self] {
        &Profile::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()).help(format!(
            "{}: {}",
            self.purpose(),
            self.flags().join(" ")
        )))
    }
}

/// Parses `--lock-prefix`: a key prefix from the bucket root, not empty, normalised to end with
/// `/`.
pub fn parse_lock_prefix(s: &str) -> Result<String, String> {
    let prefix = normalize_prefix(s.trim_start_matches('/'))?;
    if prefix.is_empty() {
        return Err("the lock prefix cannot be the bucket root".to_string());
    }
    Ok(prefix)
}

/// Parses durations such as `500ms`, `5s`, `2m`, `1h`, or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 5s, 2m)"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?} is not a duration (e.g. 500ms, 5s, 2m)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses byte sizes such as `256MiB`, `1GiB`, `512M`, `4096` (plain bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 512MiB, 2GiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("{s:?} is not a size (e.g. 512MiB, 2GiB)")),
    };
    Ok((n * mult as f64) as u64)
}

/// Parses an octal mode such as `0644` or `755`.
pub fn parse_mode(s: &str) -> Result<u16, String> {
    u16::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("{s:?} is not an octal mode such as 0644"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        assert_eq!(
            Source::parse("s3://bkt/models/llama").unwrap(),
            Source::S3 {
                bucket: "bkt".into(),
                prefix: "models/llama/".into()
            }
        );
        assert_eq!(Source::parse("s3://bkt/").unwrap().prefix(), "");
        assert_eq!(Source::parse("s3://bkt").unwrap().prefix(), "");
        assert_eq!(
            Source::parse("gs://bkt/data/set/").unwrap(),
            Source::Gcs {
                bucket: "bkt".into(),
                prefix: "data/set/".into()
            }
        );
        assert_eq!(Source::parse("gs://bkt").unwrap().prefix(), "");
        assert_eq!(Source::parse("gs://bkt/a").unwrap().prefix(), "a/");
        assert_eq!(
            Source::parse("file:///tmp/x").unwrap(),
            Source::Local {
                root: "/tmp/x".into()
            }
        );
    }

    #[test]
    fn refuses_bad_sources_with_a_hint() {
        for bad in [
            "bucket",
            "http://x",
            "s3://",
            "s3:///prefix",
            "s3://Bad_Bucket!",
            "file://relative",
            "s3://b/a//b",
            "s3://b/../x",
            "gs://",
            "gs://Bad!",
            "gs://b/a//b",
        ] {
            let err = Source::parse(bad).unwrap_err();
            assert!(!err.is_empty(), "{bad}");
        }
        let err = Source::parse("gcs://x").unwrap_err();
        assert!(err.contains("unsupported scheme"), "{err}");
        assert!(err.contains("gs://BUCKET"), "the hint lists gs://: {err}");
        assert!(
            Source::parse("gs:///x")
                .unwrap_err()
                .contains("gs://BUCKET")
        );
    }

    #[test]
    fn joins_prefixes_with_the_url_path() {
        let s = Source::parse("s3://b/models").unwrap();
        let joined = s.with_prefix("llama/").unwrap();
        assert_eq!(joined.prefix(), "models/llama/");
        assert_eq!(joined.url(), "s3://b/models/llama/");
        assert_eq!(Source::parse(&joined.url()).unwrap(), joined);
        assert_eq!(
            Source::parse("gs://b")
                .unwrap()
                .with_prefix("a/b")
                .unwrap()
                .prefix(),
            "a/b/"
        );
        assert_eq!(
            Source::parse("file:///srv/data")
                .unwrap()
                .with_prefix("sub/")
                .unwrap(),
            Source::Local {
                root: "/srv/data/sub".into()
            }
        );
        assert!(s.with_prefix("a//b").is_err());
        assert!(s.with_prefix("../x").is_err());
    }

    #[test]
    fn profiles_set_mount_options() {
        for p in Profile::ALL {
            assert!(!p.settings().is_empty(), "{p:?}");
            for flag in p.flags() {
                assert!(flag.starts_with("--") && flag.contains('='), "{flag}");
            }
        }
    }

    #[test]
    fn parses_lock_prefixes() {
        assert_eq!(
            parse_lock_prefix(".bucketfs/locks").unwrap(),
            ".bucketfs/locks/"
        );
        assert_eq!(parse_lock_prefix("/team/locks/").unwrap(), "team/locks/");
        for bad in ["", "/", "a//b", "../x"] {
            assert!(parse_lock_prefix(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_units() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("fast").is_err());
        assert_eq!(parse_size("256MiB").unwrap(), 256 << 20);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert!(parse_size("lots").is_err());
        assert_eq!(parse_mode("0644").unwrap(), 0o644);
        assert!(parse_mode("999").is_err());
    }
}
