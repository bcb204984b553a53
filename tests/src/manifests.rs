//! The repository's own files the tests read: the checkout's root, and the
//! monitoring manifests (alert rules, dashboard) both the manifest checks
//! and the daemon's end-to-end test compare against.

use std::path::PathBuf;

/// The checkout's root directory.
#[must_use]
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// `manifests/monitoring`.
#[must_use]
pub fn monitoring_dir() -> PathBuf {
    repo_root().join("manifests/monitoring")
}

/// A YAML file under manifests/monitoring.
#[must_use]
pub fn yaml(name: &str) -> serde_yaml_ng::Value {
    let text = std::fs::read_to_string(monitoring_dir().join(name)).expect("read");
    serde_yaml_ng::from_str(&text).expect("valid YAML")
}

/// The Grafana dashboard.
#[must_use]
pub fn dashboard() -> serde_json::Value {
    let text = std::fs::read_to_string(monitoring_dir().join("grafana/pitr-dashboard.json"))
        .expect("read the dashboard");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

fn pitr_names(text: &str, into: &mut Vec<String>) {
    into.extend(
        text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("pitr_"))
            .map(str::to_owned),
    );
}

fn exprs(v: &serde_json::Value, into: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => pitr_names(e, into),
                    _ => exprs(v, into),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| exprs(v, into)),
        _ => {}
    }
}

/// Every `pitr_*` metric the alert rules (Prometheus and Grafana) and the
/// dashboard's panels use, for the daemon test to check against /metrics.
#[must_use]
pub fn metrics_used_by_monitoring() -> Vec<String> {
    let mut names = Vec::new();
    for file in ["pitr-alerts.rules.yml", "grafana/pitr-alert-rules.yaml"] {
        let text = std::fs::read_to_string(monitoring_dir().join(file)).expect("read the rules");
        pitr_names(&text, &mut names);
    }
    let before = names.len();
    exprs(&dashboard(), &mut names);
    assert!(names.len() > before, "no pitr_ metric in the dashboard");
    names.sort();
    names.dedup();
    names
}
