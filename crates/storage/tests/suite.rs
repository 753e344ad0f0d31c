//! One suite, run against both backends: the directory and a real S3-compatible server
//! (moto, started by the test).

use bytes::Bytes;
use cbs_storage::{Storage, StorageError};
use cbs_testkit::s3::S3Server;

async fn fs_storage() -> (Storage, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = cbs_config::StorageConfig {
        dir: dir.path().join("artifacts"),
        ..Default::default()
    };
    (Storage::connect(&cfg).await.unwrap(), dir)
}

async fn s3_storage() -> (Storage, S3Server) {
    let server = S3Server::start("artifacts").await;
    let cfg = server.config(&server.endpoint(), "some/prefix");
    (Storage::connect(&cfg).await.unwrap(), server)
}

fn data(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

async fn read_all(s: &Storage, key: &str, range: Option<(u64, u64)>) -> Vec<u8> {
    let obj = s.get(key, range).await.unwrap();
    let len = obj.len;
    let b = obj.bytes(1 << 30).await.unwrap();
    assert_eq!(b.len() as u64, len);
    b.to_vec()
}

async fn suite(s: Storage) {
    // put_bytes / get / head
    let small = data(1000, 1);
    s.put_bytes("builds/ab/k/1/caddy.sha256", Bytes::from(small.clone()))
        .await
        .unwrap();
    assert_eq!(
        read_all(&s, "builds/ab/k/1/caddy.sha256", None).await,
        small
    );
    assert_eq!(
        s.head("builds/ab/k/1/caddy.sha256").await.unwrap(),
        Some(1000)
    );

    // put_file / get, ranged gets
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("caddy");
    let big = data(3_000_000, 2);
    std::fs::write(&file, &big).unwrap();
    assert_eq!(
        s.put_file("builds/ab/k/1/caddy", &file).await.unwrap(),
        3_000_000
    );
    assert_eq!(read_all(&s, "builds/ab/k/1/caddy", None).await, big);
    let obj = s.get("builds/ab/k/1/caddy", Some((10, 100))).await.unwrap();
    assert_eq!((obj.size, obj.start, obj.len), (3_000_000, 10, 100));
    assert_eq!(obj.bytes(1000).await.unwrap().to_vec(), big[10..110]);
    assert_eq!(
        read_all(&s, "builds/ab/k/1/caddy", Some((2_999_990, 10))).await,
        big[2_999_990..]
    );
    assert_eq!(
        read_all(&s, "builds/ab/k/1/caddy", Some((0, 1))).await,
        big[..1]
    );
    assert!(s
        .get("builds/ab/k/1/caddy", Some((2_999_990, 11)))
        .await
        .is_err());
    assert!(s
        .get("builds/ab/k/1/caddy", Some((3_000_001, 1)))
        .await
        .is_err());

    // overwrite: the new object replaces the old one whole
    let other = data(5000, 3);
    s.put_bytes("builds/ab/k/1/caddy", Bytes::from(other.clone()))
        .await
        .unwrap();
    assert_eq!(read_all(&s, "builds/ab/k/1/caddy", None).await, other);
    assert_eq!(s.head("builds/ab/k/1/caddy").await.unwrap(), Some(5000));

    // missing keys
    assert!(matches!(
        s.get("builds/ab/nothing/1/caddy", None).await,
        Err(StorageError::NotFound(_))
    ));
    assert_eq!(s.head("builds/ab/nothing/1/caddy").await.unwrap(), None);

    // bad keys are refused before anything is touched
    for bad in ["../escape", "/abs", "a/./b", "a b"] {
        assert!(matches!(
            s.put_bytes(bad, Bytes::from_static(b"x")).await,
            Err(StorageError::BadKey { .. })
        ));
    }

    // delete a prefix
    s.put_bytes("builds/cd/j/2/x", Bytes::from_static(b"1"))
        .await
        .unwrap();
    assert_eq!(s.delete_prefix("builds/ab/k").await.unwrap(), 2);
    assert_eq!(s.head("builds/ab/k/1/caddy").await.unwrap(), None);
    assert_eq!(s.head("builds/cd/j/2/x").await.unwrap(), Some(1));
    assert_eq!(s.delete_prefix("builds/ab/k").await.unwrap(), 0);

    // put-if-absent never replaces, also when writers race; list sees sizes and times
    assert!(s
        .put_bytes_if_absent("cache/a/1", Bytes::from_static(b"first"))
        .await
        .unwrap());
    assert!(!s
        .put_bytes_if_absent("cache/a/1", Bytes::from_static(b"second"))
        .await
        .unwrap());
    assert_eq!(read_all(&s, "cache/a/1", None).await, b"first");
    let racers = (0..8).map(|i| {
        let s = s.clone();
        async move {
            s.put_bytes_if_absent("cache/a/2", Bytes::from(format!("writer {i}")))
                .await
                .unwrap()
        }
    });
    let won = futures::future::join_all(racers).await;
    assert_eq!(won.iter().filter(|w| **w).count(), 1, "{won:?}");
    s.put_bytes("cache/b/3", Bytes::from_static(b"xyz"))
        .await
        .unwrap();
    let mut listed = s.list("cache").await.unwrap();
    listed.sort_by(|a, b| a.key.cmp(&b.key));
    let keys: Vec<(&str, u64)> = listed.iter().map(|l| (l.key.as_str(), l.size)).collect();
    assert_eq!(keys[0], ("cache/a/1", 5));
    assert_eq!(keys[1].0, "cache/a/2");
    assert_eq!(keys[2], ("cache/b/3", 3));
    assert_eq!(keys.len(), 3);
    let age = listed[0].modified.elapsed().unwrap_or_default();
    assert!(age < std::time::Duration::from_secs(600), "{age:?}");
    assert!(s.list("nothing-here").await.unwrap().is_empty());
}

#[tokio::test]
async fn fs_backend() {
    let (s, _dir) = fs_storage().await;
    suite(s).await;
}

#[tokio::test]
async fn s3_backend() {
    let (s, _server) = s3_storage().await;
    suite(s).await;
}

#[tokio::test]
async fn s3_objects_live_under_the_prefix_and_presigned_urls_work() {
    let (s, server) = s3_storage().await;
    s.put_bytes("builds/ab/k/1/caddy", Bytes::from_static(b"binary"))
        .await
        .unwrap();
    // Objects are private: an unsigned read is refused.
    let direct = reqwest::get(format!(
        "{}/{}/some/prefix/builds/ab/k/1/caddy",
        server.endpoint(),
        server.bucket
    ))
    .await
    .unwrap();
    assert_eq!(direct.status(), 403);
    let url = s
        .presign_get(
            "builds/ab/k/1/caddy",
            std::time::Duration::from_secs(60),
            "caddy",
        )
        .await
        .unwrap()
        .expect("s3 presigns");
    assert!(url.contains("X-Amz-Signature="), "{url}");
    // The object is at <prefix>/<key> in the bucket (path style).
    assert!(
        url.contains("/artifacts/some/prefix/builds/ab/k/1/caddy?"),
        "{url}"
    );
    assert!(!url.contains(cbs_testkit::s3::SECRET_ACCESS_KEY));
    let resp = reqwest::get(&url).await.unwrap();
    assert_eq!(resp.status(), 200);
    // S3 names the download from the signed response-content-disposition (moto ignores it).
    assert!(
        url.contains("response-content-disposition=attachment"),
        "{url}"
    );
    assert_eq!(resp.bytes().await.unwrap().as_ref(), b"binary");
    // fs has no presigned URLs
    let (fs, _dir) = fs_storage().await;
    assert_eq!(
        fs.presign_get("a", std::time::Duration::from_secs(1), "caddy")
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn s3_unreachable_is_unavailable_not_not_found() {
    let server = S3Server::start("artifacts").await;
    let gate = cbs_testkit::s3::Gate::start(server.addr(), false).await;
    let s = Storage::connect(&server.config(&gate.url(), ""))
        .await
        .unwrap();
    let err = s
        .put_bytes("k", Bytes::from_static(b"x"))
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Unavailable(_)), "{err:?}");
    let err = s.head("k").await.unwrap_err();
    assert!(matches!(err, StorageError::Unavailable(_)), "{err:?}");
    assert!(!format!("{err}").contains(cbs_testkit::s3::SECRET_ACCESS_KEY));
    gate.set_open(true);
    s.put_bytes("k", Bytes::from_static(b"x")).await.unwrap();
    assert_eq!(s.head("k").await.unwrap(), Some(1));
}
