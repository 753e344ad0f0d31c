//! A 200 MB object through both backends with bounded memory: the process's peak resident
//! memory (VmHWM, reset through /proc/self/clear_refs before each phase) may not grow by
//! more than a small fraction of the object. Its own test binary, so no other test's memory
//! counts.

use futures::TryStreamExt;
use sha2::Digest;
use std::io::Write;

const SIZE: u64 = 200 * 1024 * 1024;
/// Allowed growth of peak RSS while moving the object (a quarter of it would mean buffering).
const BOUND: u64 = 48 * 1024 * 1024;

fn status_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Resets the peak to the current RSS; returns the current RSS in bytes.
fn reset_peak() -> u64 {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    status_kb("VmRSS:") * 1024
}

fn peak() -> u64 {
    status_kb("VmHWM:") * 1024
}

async fn round_trip(s: &cbs_storage::Storage, file: &std::path::Path, want: &str) {
    let base = reset_peak();
    assert_eq!(s.put_file("big/object", file).await.unwrap(), SIZE);
    let up = peak().saturating_sub(base);
    let base = reset_peak();
    let obj = s.get("big/object", None).await.unwrap();
    assert_eq!(obj.size, SIZE);
    let mut h = sha2::Sha256::new();
    let mut n = 0u64;
    let mut body = obj.body;
    while let Some(chunk) = body.try_next().await.unwrap() {
        n += chunk.len() as u64;
        h.update(&chunk);
    }
    let down = peak().saturating_sub(base);
    assert_eq!(n, SIZE);
    assert_eq!(hex::encode(h.finalize()), want);
    let what = s.describe();
    assert!(up < BOUND, "{what}: upload grew peak RSS by {up} bytes");
    assert!(
        down < BOUND,
        "{what}: download grew peak RSS by {down} bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_mb_object_with_bounded_memory_on_both_backends() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big");
    let mut h = sha2::Sha256::new();
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
        let mut block = vec![0u8; 1 << 20];
        for i in 0..(SIZE >> 20) {
            for (j, b) in block.iter_mut().enumerate() {
                *b = (j as u64 ^ i.wrapping_mul(0x9E37_79B9)) as u8;
            }
            h.update(&block);
            f.write_all(&block).unwrap();
        }
        f.flush().unwrap();
    }
    let want = hex::encode(h.finalize());

    let fs = cbs_storage::Storage::connect(&cbs_config::StorageConfig {
        dir: dir.path().join("store"),
        ..Default::default()
    })
    .await
    .unwrap();
    round_trip(&fs, &file, &want).await;

    let server = cbs_testkit::s3::S3Server::start("big").await;
    let s3 = cbs_storage::Storage::connect(&server.config(&server.endpoint(), ""))
        .await
        .unwrap();
    round_trip(&s3, &file, &want).await;
}
