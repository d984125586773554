//! What the benchmark's baseline programs (`direct_download`, `direct_upload`) share: sizes on
//! the command line, the S3 client, and the JSON line they print.

use aws_sdk_s3::Client;
use aws_sdk_s3::config::RequestChecksumCalculation;
use aws_sdk_s3::config::retry::RetryConfig;
use bucketfs::store::s3::S3Options;

/// A part size in bucketfs' own syntax (`8MiB`, `512k`, `100` bytes: see
/// `bucketfs::config::parse_size`), so a baseline reads a size as the mount it is compared with
/// does; zero is refused (no part could be sent).
pub fn parse_part_size(s: &str) -> Result<u64, String> {
    match bucketfs::config::parse_size(s)? {
        0 => Err(format!("{s:?}: a part size cannot be zero")),
        n => Ok(n),
    }
}

/// How to reach the store (flattened into each program's arguments).
#[derive(clap::Args, Debug)]
pub struct StoreArgs {
    /// S3-compatible endpoint (default: AWS).
    #[arg(long)]
    pub endpoint_url: Option<String>,
    /// Region (default: from the AWS configuration, else us-east-1).
    #[arg(long)]
    pub region: Option<String>,
    /// Address buckets as ENDPOINT/BUCKET.
    #[arg(long)]
    pub force_path_style: bool,
}

/// One client (one connection pool), built as bucketfs builds its own, with 3 SDK attempts: a
/// baseline has no retry layer of its own as bucketfs does.
/// `checksum_when_required`: send checksums only where S3 requires them (the SDK's default adds
/// one to every upload).
pub async fn s3_client(store: &StoreArgs, checksum_when_required: bool) -> Client {
    let opts = S3Options {
        endpoint_url: store.endpoint_url.clone(),
        region: store.region.clone(),
        force_path_style: store.force_path_style,
        ..S3Options::default()
    };
    let mut conf = bucketfs::store::s3::client(&opts)
        .await
        .config()
        .to_builder()
        .retry_config(RetryConfig::standard().with_max_attempts(3));
    if checksum_when_required {
        conf = conf.request_checksum_calculation(RequestChecksumCalculation::WhenRequired);
    }
    Client::from_conf(conf.build())
}

/// Peak resident memory of this process (VmHWM), in KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Prints the result (a JSON object) with the peak RSS added, or the error, then exits 1.
pub fn finish(program: &str, result: Result<String, Box<dyn std::error::Error + Send + Sync>>) {
    match result {
        Ok(json) => println!(
            "{},\"peak_rss_kib\":{}}}",
            json.strip_suffix('}').unwrap_or(&json),
            peak_rss_kib()
        ),
        Err(e) => {
            eprintln!("{program}: {e}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_part_size;

    #[test]
    fn part_sizes_read_as_bucketfs_reads_them() {
        for size in ["8MiB", "512k", "100", "1GB", "2GiB"] {
            assert_eq!(parse_part_size(size), bucketfs::config::parse_size(size));
        }
        assert_eq!(parse_part_size("1GB"), Ok(1 << 30));
        assert!(parse_part_size("0").is_err());
        assert!(parse_part_size("x").is_err());
    }
}
