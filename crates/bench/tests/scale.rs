//! The short variant of `bench scale` (the full one is scripts/bench-scale): a few thousand
//! builds loaded, every figure measured once over, and `rebuild-projections` finding the
//! loaded projection equal to the fold of the log. Checks that the benchmark runs and its
//! data is what the live path writes, not its speed.

#[tokio::test(flavor = "multi_thread")]
async fn the_scale_benchmark_runs_on_a_small_database() {
    let db = cbs_testkit::TestDb::new().await;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cbs-bench"))
        .args([
            "scale",
            "--builds",
            "6000",
            "--queued",
            "300",
            "--running",
            "20",
            "--samples",
            "50",
            "--rebuild",
        ])
        .env("CONFIG_PATH", root.join("config.example.yml"))
        .env("DATABASE_URL", db.config().url.expose())
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for figure in [
        "status read",
        "history of one build",
        "events and output of one build",
        "output retention scan, all due",
        "build_output:",
        "feed page of 100, all types",
        "claim with 300 queued",
        "claim, commit without WAL flush wait",
        "janitor scan",
        "database bytes per build",
        "rebuild-projections: 6000 builds",
        "0 differences",
    ] {
        assert!(stdout.contains(figure), "{figure}: {stdout}");
    }
    // The queue is as long as it was loaded (every claim handed its build back).
    let c = db.client().await;
    let queued: i64 = c
        .query_one("SELECT count(*) FROM builds WHERE status = 'queued'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(queued, 300);
}
