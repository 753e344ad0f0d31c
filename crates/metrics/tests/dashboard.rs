//! The Grafana dashboard in deploy/ asks only for metrics this server has: a renamed or
//! removed metric fails here, not on an operator's screen.

#[test]
fn the_dashboard_queries_only_metrics_that_exist() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/grafana-dashboard.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    // Families whose labels come from what happens (platforms, steps, routes, backends)
    // show only once they have a sample: give each one.
    let m = cbs_metrics::metrics();
    let (os, arch) = ("linux", "amd64");
    m.build_duration
        .get_or_create(&cbs_metrics::BuildLabels {
            os,
            arch,
            outcome: "succeeded",
        })
        .observe(1.0);
    m.step_duration
        .get_or_create(&cbs_metrics::StepLabels {
            step: "compile",
            os,
            arch,
        })
        .observe(1.0);
    m.storage_op("fs", "put", std::time::Duration::from_millis(1), false);
    let route = || ("/api/build".to_owned(), "GET".to_owned());
    m.http_requests
        .get_or_create(&cbs_metrics::HttpLabels {
            route: route().0,
            method: route().1,
            status: 200,
        })
        .inc();
    m.http_duration
        .get_or_create(&cbs_metrics::RouteLabels {
            route: route().0,
            method: route().1,
        })
        .observe(0.1);
    let exposition = m.encode();
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("cbs_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                // Counters are declared without `_total`, histograms without their series'
                // suffixes.
                let family = ["_bucket", "_count", "_sum", "_total"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(&name);
                assert!(
                    exposition.contains(&format!("# TYPE {family} ")),
                    "panel {:?} asks for {name}, which the server does not export",
                    panel["title"]
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 20, "only {checked} metric references found");
}
