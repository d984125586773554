//! The baseline of the model-loading benchmark: the best direct download of one object.
//!
//! One S3 client (one connection pool, keep-alive), one HEAD for size and ETag, then the object in
//! `--part-size` ranged GETs, `--concurrency` of them in flight at once, each pinned to the ETag.
//! The bytes go to memory (every cache line is read, then dropped) or to a file written at each
//! part's offset. Prints one JSON line: bytes, seconds (HEAD to last byte), MiB/s and the
//! process's peak RSS.
//!
//! `--list` instead lists every key under KEY as a prefix (ListObjectsV2 pages), the baseline of
//! the listing benchmark.
//!
//! `--offsets A,B,...` instead GETs `--read-size` bytes at each offset, one after another (after
//! the HEAD, as an open does): the baseline of random `pread`s at the same offsets, which no
//! reader of one range at a time can beat, since each read costs at least one round trip.
//!
//! ```text
//! cargo run --release --example direct_download -- BUCKET KEY --endpoint-url http://127.0.0.1:8333 \
//!     --force-path-style --part-size 8MiB --concurrency 16
//! ```

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use aws_sdk_s3::Client;
use aws_sdk_s3::error::DisplayErrorContext;
use bytes::BytesMut;
use clap::Parser;
use futures::StreamExt;

mod common;
use common::{StoreArgs, parse_part_size};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser, Debug)]
#[command(about = "Parallel ranged download of one S3 object (benchmark baseline)")]
struct Args {
    bucket: String,
    /// Object key (with --list: a prefix).
    key: String,
    #[command(flatten)]
    store: StoreArgs,
    /// Size of each ranged GET (default: the one bucketfs reads ahead with).
    #[arg(long, default_value = bucketfs::config::READ_PART_SIZE.text, value_parser = parse_part_size)]
    part_size: u64,
    /// Ranged GETs in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Write the object to this file instead of keeping it in memory.
    #[arg(long)]
    output: Option<PathBuf>,
    /// List the keys under KEY instead of downloading.
    #[arg(long)]
    list: bool,
    /// Instead of the whole object: one ranged GET of --read-size bytes at each of these offsets,
    /// one after another.
    #[arg(long, value_delimiter = ',')]
    offsets: Vec<u64>,
    /// Bytes per GET with --offsets.
    #[arg(long, default_value = "4MiB", value_parser = parse_part_size)]
    read_size: u64,
}

/// Reads one byte of every 64 (every cache line), so the download cannot be optimised away.
fn touch(data: &[u8]) -> u64 {
    data.iter()
        .step_by(64)
        .fold(0u64, |acc, &b| acc.wrapping_mul(31).wrapping_add(b as u64))
}

async fn get_part(
    client: Client,
    bucket: Arc<str>,
    key: Arc<str>,
    etag: Arc<str>,
    start: u64,
    end: u64,
    file: Option<Arc<std::fs::File>>,
) -> Result<(u64, u64), Error> {
    let out = client
        .get_object()
        .bucket(&*bucket)
        .key(&*key)
        .range(format!("bytes={start}-{}", end - 1))
        .if_match(&*etag)
        .send()
        .await
        .map_err(|e| {
            format!(
                "GET {key} bytes {start}-{}: {}",
                end - 1,
                DisplayErrorContext(e)
            )
        })?;
    let mut body = out.body;
    let mut got = 0u64;
    let mut sum = 0u64;
    let mut buf = file
        .as_ref()
        .map(|_| BytesMut::with_capacity((end - start) as usize));
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| format!("reading {key} at {start}: {e}"))?;
        got += chunk.len() as u64;
        match &mut buf {
            Some(buf) => buf.extend_from_slice(&chunk),
            None => sum = sum.wrapping_add(touch(&chunk)),
        }
    }
    if got != end - start {
        return Err(format!("{key}: got {got} bytes for a range of {}", end - start).into());
    }
    if let (Some(file), Some(buf)) = (file, buf) {
        tokio::task::spawn_blocking(move || file.write_all_at(&buf, start)).await??;
    }
    Ok((got, sum))
}

/// The object's size and ETag (every GET is pinned to it).
async fn head(args: &Args, client: &Client) -> Result<(u64, Arc<str>), Error> {
    let head = client
        .head_object()
        .bucket(&args.bucket)
        .key(&args.key)
        .send()
        .await
        .map_err(|e| format!("HEAD {}: {}", args.key, DisplayErrorContext(e)))?;
    let size = head.content_length().unwrap_or(0).max(0) as u64;
    Ok((size, head.e_tag().unwrap_or("*").into()))
}

async fn download(args: &Args, client: Client) -> Result<String, Error> {
    let started = Instant::now();
    let (size, etag) = head(args, &client).await?;
    let file = match &args.output {
        Some(path) => {
            let f = std::fs::File::create(path)?;
            f.set_len(size)?;
            Some(Arc::new(f))
        }
        None => None,
    };
    let bucket: Arc<str> = args.bucket.as_str().into();
    let key: Arc<str> = args.key.as_str().into();
    let part = args.part_size;
    let parts = size.div_ceil(part);
    let mut results = futures::stream::iter(0..parts)
        .map(|i| {
            let start = i * part;
            let end = (start + part).min(size);
            tokio::spawn(get_part(
                client.clone(),
                bucket.clone(),
                key.clone(),
                etag.clone(),
                start,
                end,
                file.clone(),
            ))
        })
        .buffer_unordered(args.concurrency.max(1));
    let (mut bytes, mut sum) = (0u64, 0u64);
    while let Some(r) = results.next().await {
        let (n, s) = r??;
        bytes += n;
        sum = sum.wrapping_add(s);
    }
    let seconds = started.elapsed().as_secs_f64();
    if bytes != size {
        return Err(format!("downloaded {bytes} bytes of {size}").into());
    }
    Ok(format!(
        "{{\"bytes\":{bytes},\"seconds\":{seconds:.6},\"mib_per_s\":{:.3},\"parts\":{parts},\
         \"part_size\":{part},\"concurrency\":{},\"output\":\"{}\",\"touch\":{sum}}}",
        bytes as f64 / (1 << 20) as f64 / seconds,
        args.concurrency,
        if args.output.is_some() {
            "file"
        } else {
            "memory"
        }
    ))
}

async fn random_reads(args: &Args, client: Client) -> Result<String, Error> {
    let started = Instant::now();
    let (size, etag) = head(args, &client).await?;
    let bucket: Arc<str> = args.bucket.as_str().into();
    let key: Arc<str> = args.key.as_str().into();
    let (mut bytes, mut sum) = (0u64, 0u64);
    for &start in &args.offsets {
        let end = (start + args.read_size).min(size);
        if start >= end {
            return Err(format!("offset {start} is past the end of {key} ({size} bytes)").into());
        }
        let (n, s) = get_part(
            client.clone(),
            bucket.clone(),
            key.clone(),
            etag.clone(),
            start,
            end,
            None,
        )
        .await?;
        bytes += n;
        sum = sum.wrapping_add(s);
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(format!(
        "{{\"bytes\":{bytes},\"seconds\":{seconds:.6},\"mib_per_s\":{:.3},\"reads\":{},\
         \"read_size\":{},\"touch\":{sum}}}",
        bytes as f64 / (1 << 20) as f64 / seconds,
        args.offsets.len(),
        args.read_size
    ))
}

async fn list(args: &Args, client: Client) -> Result<String, Error> {
    let started = Instant::now();
    let mut pages = client
        .list_objects_v2()
        .bucket(&args.bucket)
        .prefix(&args.key)
        .into_paginator()
        .send();
    let (mut objects, mut bytes, mut requests) = (0u64, 0u64, 0u64);
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| format!("LIST {}: {}", args.key, DisplayErrorContext(e)))?;
        requests += 1;
        for o in page.contents() {
            objects += 1;
            bytes += o.size().unwrap_or(0).max(0) as u64;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(format!(
        "{{\"objects\":{objects},\"bytes\":{bytes},\"requests\":{requests},\"seconds\":{seconds:.6},\
         \"objects_per_s\":{:.3}}}",
        objects as f64 / seconds
    ))
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let client = common::s3_client(&args.store, false).await;
    let result = if args.list {
        list(&args, client).await
    } else if !args.offsets.is_empty() {
        random_reads(&args, client).await
    } else {
        download(&args, client).await
    };
    common::finish("direct_download", result);
}
