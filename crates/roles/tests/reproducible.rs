//! Builds are bit-for-bit reproducible: two servers (each its own database, module proxy,
//! worker id, build directory and Go caches; the same builder image) build the same requests
//! across the fixture set, and every binary has the same SHA-256 on both. Prints the rate
//! (docs/benchmarks.md reports it).

mod common;
use common::{client, server};

/// Linux, Windows, ARM and macOS, with plugins (one with an upper-case path, one with a
/// major-version suffix) and without.
const REQUESTS: [&str; 5] = [
    "os=linux&arch=amd64&p=github.com/acme/alpha@v1.0.0",
    "os=windows&arch=amd64&p=github.com/Acme/Beta",
    "os=linux&arch=arm&arm=7&p=example.com/gamma/v2",
    "os=darwin&arch=arm64",
    "os=linux&arch=arm64&p=github.com/acme/alpha&p=example.com/gamma/v2@v2.0.0",
];

async fn build_all(base: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for q in REQUESTS {
        let r = client()
            .get(format!("{base}/api/download?{q}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{q}");
        let key = r.headers()["x-caddy-build-key"]
            .to_str()
            .unwrap()
            .to_owned();
        let bytes = r.bytes().await.unwrap();
        use sha2::Digest;
        out.push((key, hex::encode(sha2::Sha256::digest(&bytes))));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_with_their_own_directories_build_the_same_bytes() {
    let a = server(true).await;
    let b = server(true).await;
    assert_ne!(
        a.app.config.worker.cache_dir, b.app.config.worker.cache_dir,
        "the two workers must not share caches"
    );
    let first = build_all(&a.base).await;
    let second = build_all(&b.base).await;
    let mut same = 0;
    for (q, (x, y)) in REQUESTS.iter().zip(first.iter().zip(&second)) {
        assert_eq!(x.0, y.0, "{q}: the same request has the same key");
        if x.1 == y.1 {
            same += 1;
        } else {
            eprintln!("{q}: {} on one worker, {} on the other", x.1, y.1);
        }
    }
    eprintln!("reproduced {same} of {} builds bit for bit", REQUESTS.len());
    assert_eq!(same, REQUESTS.len());
}
