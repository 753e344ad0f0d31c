//! `bench storage`: upload and download throughput of one large artifact through the
//! configured storage backend, and how much the process's peak resident memory grew while
//! doing each (VmHWM, reset through /proc/self/clear_refs before each phase).

use std::io::Write;
use std::time::Instant;

use anyhow::Context;
use futures::TryStreamExt;

use crate::print_out;

/// Options of `bench storage`.
#[derive(Debug, clap::Args)]
pub struct StorageArgs {
    /// Size of the artifact in MiB.
    #[arg(long, default_value_t = 200)]
    pub size_mib: u64,
    /// Rounds of upload + download.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
}

fn status_kib(field: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Resets the peak to the current RSS (Linux); returns the current RSS in KiB.
fn reset_peak() -> Option<u64> {
    std::fs::write("/proc/self/clear_refs", "5").ok()?;
    status_kib("VmRSS:")
}

fn growth(base: Option<u64>) -> String {
    match (base, status_kib("VmHWM:")) {
        (Some(b), Some(p)) => format!("{:.1} MiB", p.saturating_sub(b) as f64 / 1024.0),
        _ => "?".into(),
    }
}

/// Runs the benchmark.
pub async fn run(config: &cbs_config::Config, args: StorageArgs) -> anyhow::Result<()> {
    let storage = cbs_storage::Storage::connect(&config.storage).await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("artifact");
    let size = args.size_mib << 20;
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&file)?);
        let mut block = vec![0u8; 1 << 20];
        for i in 0..args.size_mib {
            rand::Rng::fill(&mut rand::rng(), &mut block[..]);
            block[0] = i as u8;
            f.write_all(&block)?;
        }
        f.flush()?;
    }
    print_out(&format!(
        "# bench storage: {} MiB through {}\n",
        args.size_mib,
        storage.describe()
    ));
    let key = format!("bench/{:016x}/artifact", rand::random::<u64>());
    for round in 1..=args.rounds {
        let base = reset_peak();
        let t = Instant::now();
        let stored = storage.put_file(&key, &file).await.context("upload")?;
        let up = t.elapsed();
        let up_mem = growth(base);
        anyhow::ensure!(stored == size, "stored {stored} of {size} bytes");
        let base = reset_peak();
        let t = Instant::now();
        let object = storage.get(&key, None).await.context("download")?;
        let mut body = object.body;
        let mut n = 0u64;
        while let Some(chunk) = body.try_next().await? {
            n += chunk.len() as u64;
        }
        let down = t.elapsed();
        let down_mem = growth(base);
        anyhow::ensure!(n == size, "read {n} of {size} bytes");
        let mbs = |d: std::time::Duration| size as f64 / d.as_secs_f64() / 1e6;
        print_out(&format!(
            "  round {round}: upload {:.0} MB/s (peak RSS +{up_mem}), download {:.0} MB/s (peak RSS +{down_mem})\n",
            mbs(up),
            mbs(down),
        ));
    }
    let prefix = key.rsplit_once('/').map(|(p, _)| p).unwrap_or(&key);
    storage.delete_prefix(prefix).await?;
    Ok(())
}
