//! What the benchmark's baseline programs (`direct_download`, `direct_upload`) share: sizes on
//! the command line, the S3 client, and the JSON line they print.

use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::RequestChecksumCalculation;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;

/// A size such as `8MiB`, `512k`, `1GB` or `100` (bytes); zero is refused.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("bad size {s:?}"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1000,
        "mb" => 1000 * 1000,
        "gb" => 1000 * 1000 * 1000,
        _ => return Err(format!("bad size unit in {s:?}")),
    };
    n.checked_mul(mult)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("bad size {s:?}"))
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

/// One client (one connection pool): 3 attempts, 5 s to connect, 60 s between bytes.
/// `checksum_when_required`: send checksums only where S3 requires them (the SDK's default adds
/// one to every upload).
pub async fn s3_client(store: &StoreArgs, checksum_when_required: bool) -> Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(region) = &store.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(url) = &store.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    let shared = loader.load().await;
    let mut conf = aws_sdk_s3::config::Builder::from(&shared)
        .retry_config(RetryConfig::standard().with_max_attempts(3))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .read_timeout(Duration::from_secs(60))
                .build(),
        )
        .force_path_style(store.force_path_style);
    if checksum_when_required {
        conf = conf.request_checksum_calculation(RequestChecksumCalculation::WhenRequired);
    }
    if shared.region().is_none() {
        conf = conf.region(aws_config::Region::new("us-east-1"));
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
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8MiB"), Ok(8 << 20));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("100"), Ok(100));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("0").is_err());
        assert!(parse_size("x").is_err());
    }
}
