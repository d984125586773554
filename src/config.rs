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
