//! The baseline of the checkpoint-write benchmark: the best direct multipart upload of one file.
//!
//! One S3 client (one connection pool, keep-alive): CreateMultipartUpload, then the file in
//! `--part-size` parts, `--concurrency` UploadPart requests in flight at once, then
//! CompleteMultipartUpload. Each part is read from the file with `pread` just before it is sent
//! (a checkpoint written from a local file), or, with `--memory`, the whole file is read into
//! memory first, outside the clock, and parts are slices of it (a checkpoint already in RAM). A
//! failed upload is aborted, so nothing is left behind.
//!
//! Prints one JSON line: bytes, seconds (create to complete), MiB/s, parts and the process's peak
//! RSS.
//!
//! ```text
//! cargo run --release --example direct_upload -- BUCKET KEY --file ckpt.bin \
//!     --endpoint-url http://127.0.0.1:8333 --force-path-style --part-size 16MiB --concurrency 8
//! ```

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use aws_sdk_s3::Client;
use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use clap::Parser;
use futures::StreamExt;

mod common;
use common::{StoreArgs, parse_part_size};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser, Debug)]
#[command(about = "Parallel multipart upload of one file to S3 (benchmark baseline)")]
struct Args {
    bucket: String,
    key: String,
    /// The file to upload.
    #[arg(long)]
    file: PathBuf,
    /// Read the whole file into memory before the clock starts and upload from there.
    #[arg(long)]
    memory: bool,
    #[command(flatten)]
    store: StoreArgs,
    /// Size of each part (default: bucketfs' --write-part-size; S3: at least 5 MiB except the
    /// last, at most 10,000 parts).
    #[arg(long, default_value = bucketfs::config::WRITE_PART_SIZE.text, value_parser = parse_part_size)]
    part_size: u64,
    /// UploadPart requests in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Send checksums only where S3 requires them (the SDK's default adds a CRC32 to every part).
    #[arg(long)]
    no_checksum: bool,
}

/// Where the parts' bytes come from.
enum Source {
    File(Arc<std::fs::File>),
    Memory(Bytes),
}

impl Source {
    async fn part(&self, start: u64, len: u64) -> Result<Bytes, Error> {
        match self {
            Source::Memory(all) => Ok(all.slice(start as usize..(start + len) as usize)),
            Source::File(f) => {
                let f = f.clone();
                let buf = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; len as usize];
                    f.read_exact_at(&mut buf, start).map(|_| buf)
                })
                .await??;
                Ok(Bytes::from(buf))
            }
        }
    }
}

struct Upload {
    client: Client,
    bucket: String,
    key: String,
    id: String,
}

impl Upload {
    async fn part(
        &self,
        source: &Source,
        number: i32,
        start: u64,
        len: u64,
    ) -> Result<CompletedPart, Error> {
        let body = source.part(start, len).await?;
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(&self.id)
            .part_number(number)
            .content_length(len as i64)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| format!("UploadPart {number}: {}", DisplayErrorContext(e)))?;
        Ok(CompletedPart::builder()
            .part_number(number)
            .set_e_tag(out.e_tag().map(str::to_string))
            .set_checksum_crc32(out.checksum_crc32().map(str::to_string))
            .set_checksum_crc32_c(out.checksum_crc32_c().map(str::to_string))
            .set_checksum_crc64_nvme(out.checksum_crc64_nvme().map(str::to_string))
            .set_checksum_sha1(out.checksum_sha1().map(str::to_string))
            .set_checksum_sha256(out.checksum_sha256().map(str::to_string))
            .build())
    }

    async fn abort(&self) {
        if let Err(e) = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(&self.id)
            .send()
            .await
        {
            eprintln!(
                "direct_upload: could not abort the upload: {}",
                DisplayErrorContext(e)
            );
        }
    }
}

async fn upload(args: &Args, client: Client) -> Result<String, Error> {
    let file =
        std::fs::File::open(&args.file).map_err(|e| format!("{}: {e}", args.file.display()))?;
    let size = file.metadata()?.len();
    let source = if args.memory {
        let f = Arc::new(file);
        let all = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; size as usize];
            f.read_exact_at(&mut buf, 0).map(|_| buf)
        })
        .await??;
        Source::Memory(Bytes::from(all))
    } else {
        Source::File(Arc::new(file))
    };
    let part = args.part_size;
    let parts = size.div_ceil(part).max(1);
    if parts > 10_000 {
        return Err(format!("{parts} parts of {part} bytes: S3 allows 10,000").into());
    }

    let started = Instant::now();
    let created = client
        .create_multipart_upload()
        .bucket(&args.bucket)
        .key(&args.key)
        .send()
        .await
        .map_err(|e| {
            format!(
                "CreateMultipartUpload {}: {}",
                args.key,
                DisplayErrorContext(e)
            )
        })?;
    let up = Arc::new(Upload {
        client: client.clone(),
        bucket: args.bucket.clone(),
        key: args.key.clone(),
        id: created
            .upload_id()
            .ok_or("no upload id in the answer")?
            .to_string(),
    });
    let source = Arc::new(source);
    let mut results = futures::stream::iter(0..parts)
        .map(|i| {
            let (up, source) = (up.clone(), source.clone());
            let start = i * part;
            let len = part.min(size - start);
            tokio::spawn(async move { up.part(&source, i as i32 + 1, start, len).await })
        })
        .buffer_unordered(args.concurrency.max(1));
    let mut done = Vec::with_capacity(parts as usize);
    let mut failure: Option<Error> = None;
    while let Some(r) = results.next().await {
        match r {
            Ok(Ok(p)) => done.push(p),
            Ok(Err(e)) => {
                failure = Some(e);
                break;
            }
            Err(e) => {
                failure = Some(e.into());
                break;
            }
        }
    }
    drop(results);
    if let Some(e) = failure {
        up.abort().await;
        return Err(e);
    }
    done.sort_by_key(|p| p.part_number());
    let completed = client
        .complete_multipart_upload()
        .bucket(&args.bucket)
        .key(&args.key)
        .upload_id(&up.id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(done))
                .build(),
        )
        .send()
        .await;
    let completed = match completed {
        Ok(c) => c,
        Err(e) => {
            up.abort().await;
            return Err(format!(
                "CompleteMultipartUpload {}: {}",
                args.key,
                DisplayErrorContext(e)
            )
            .into());
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    Ok(format!(
        "{{\"bytes\":{size},\"seconds\":{seconds:.6},\"mib_per_s\":{:.3},\"parts\":{parts},\
         \"part_size\":{part},\"concurrency\":{},\"source\":\"{}\",\"etag\":{:?}}}",
        size as f64 / (1 << 20) as f64 / seconds,
        args.concurrency,
        if args.memory { "memory" } else { "file" },
        completed.e_tag().unwrap_or("").trim_matches('"')
    ))
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let client = common::s3_client(&args.store, args.no_checksum).await;
    let result = upload(&args, client).await;
    common::finish("direct_upload", result);
}
