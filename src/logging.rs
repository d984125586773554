//! Logging through `tracing`: human-readable text (colored on a terminal) or one JSON object per
//! line (`--log-format json`) for cluster log pipelines. Both go to stderr, or to `--log-file`.
//!
//! ## No credentials in the log
//! bucketfs' own log lines name buckets, keys and errors, never credentials or request URLs. The
//! HTTP and cloud SDK crates underneath are noisier: at debug and trace levels the AWS SDK logs
//! canonical requests and signing material, and the HTTP stacks log headers. So those crates are
//! held at `warn` whatever `--log-level` says, unless the filter names them itself
//! (`--log-level info,aws_sigv4=trace` is the user asking, for debugging on their own machine).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines look.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event (the default: a person reads it first).
    #[default]
    Text,
    /// One JSON object per event, fields at the top level.
    Json,
}

/// Crates (target prefixes) that may log credentials, signatures or signed headers at debug and
/// trace levels.
const QUIET: &[&str] = &[
    "aws", "gcloud", "google", "hyper", "h2", "reqwest", "rustls", "tower",
];

/// The filter for `level` with the [`QUIET`] crates held at `warn` unless named by `level`.
/// Only a default level more verbose than `warn` is capped; a quieter one (or none, which
/// means off) already keeps them quiet.
fn filter_spec(level: &str) -> String {
    let directives: Vec<&str> = level.split(',').map(str::trim).collect();
    let verbose_default = directives.iter().any(|d| {
        ["info", "debug", "trace"]
            .iter()
            .any(|l| d.eq_ignore_ascii_case(l))
    });
    if !verbose_default {
        return level.trim().to_string();
    }
    let named: Vec<&str> = directives
        .iter()
        .filter_map(|d| {
            let target = d.split(['=', '[']).next()?.trim();
            (d.contains('=') || d.contains('[')).then_some(target)
        })
        .collect();
    let mut spec = level.trim().to_string();
    for quiet in QUIET {
        if !named.iter().any(|t| t.starts_with(quiet)) {
            spec.push_str(&format!(",{quiet}=warn"));
        }
    }
    spec
}

/// Installs the global subscriber, writing to `file` if given, else to stderr. Fails on a filter
/// that does not parse.
pub fn init(level: &str, format: LogFormat, file: Option<std::fs::File>) -> Result<(), String> {
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    let filter = EnvFilter::try_new(filter_spec(level)).map_err(|e| e.to_string())?;
    let ansi = file.is_none() && std::io::stderr().is_terminal();
    let writer = match file {
        Some(f) => BoxMakeWriter::new(std::sync::Arc::new(f)),
        None => BoxMakeWriter::new(std::io::stderr),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    // A second init (tests, or a subcommand calling it twice) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.with_ansi(ansi).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noisy_crates_stay_at_warn_unless_named() {
        let spec = filter_spec("trace");
        assert!(spec.starts_with("trace,"), "{spec}");
        assert!(spec.contains(",aws=warn"), "{spec}");
        assert!(spec.contains(",hyper=warn"), "{spec}");
        let spec = filter_spec("info,aws_sigv4=trace");
        assert!(!spec.contains("aws=warn"), "{spec}");
        assert!(spec.contains(",reqwest=warn"), "{spec}");
        // A level alone names no crate.
        assert!(filter_spec("debug").contains("gcloud=warn"));
        // Quieter defaults are left alone: they never raise those crates to warn.
        assert_eq!(filter_spec("error"), "error");
        assert_eq!(filter_spec("bucketfs=debug"), "bucketfs=debug");
        for spec in ["info", "bucketfs=debug", "warn,aws_config=info"] {
            EnvFilter::try_new(filter_spec(spec)).unwrap();
        }
    }
}
