//! The repository's own files the tests read: the checkout's root, and the
//! monitoring manifests (alert rules, dashboard) both the manifest checks
//! and the daemon's end-to-end test compare against.

use std::path::PathBuf;
use std::process::Command;

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

/// The production overlay with `components/<component>` added, rendered by
/// `kubectl kustomize`; and a directory under `target/` for what the caller
/// writes of it.
///
/// # Panics
/// kubectl is missing or the render fails.
#[must_use]
pub fn render_with_component(component: &str) -> (PathBuf, String) {
    let overlays = repo_root().join("manifests/overlays");
    let copy = overlays.join(format!(".test-{component}-{}", std::process::id()));
    std::fs::create_dir_all(&copy).expect("mkdir");
    for entry in std::fs::read_dir(overlays.join("production")).expect("production") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), copy.join(entry.file_name())).expect("copy");
    }
    let kustomization = copy.join("kustomization.yaml");
    let text = std::fs::read_to_string(&kustomization).expect("read");
    assert!(
        text.contains("\ncomponents:\n"),
        "production lists components"
    );
    std::fs::write(
        &kustomization,
        text.replacen(
            "\ncomponents:\n",
            &format!("\ncomponents:\n  - ../../components/{component}\n"),
            1,
        ),
    )
    .expect("write");
    let out = Command::new("kubectl").arg("kustomize").arg(&copy).output();
    let _ = std::fs::remove_dir_all(&copy);
    let out = out.expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl kustomize with the {component} component:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = repo_root().join(format!(
        "target/kustomize-{component}-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("mkdir");
    (dir, String::from_utf8(out.stdout).expect("UTF-8"))
}

/// The `args` of container `container` of the StatefulSet `name` in a
/// rendered stream of manifests.
///
/// # Panics
/// No such StatefulSet or container.
#[must_use]
pub fn statefulset_args(rendered: &str, name: &str, container: &str) -> Vec<String> {
    use serde::Deserialize as _;
    for doc in serde_yaml_ng::Deserializer::from_str(rendered) {
        let v = serde_yaml_ng::Value::deserialize(doc).expect("YAML");
        if v["kind"].as_str() != Some("StatefulSet") || v["metadata"]["name"].as_str() != Some(name)
        {
            continue;
        }
        let containers = v["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .expect("containers");
        let c = containers
            .iter()
            .find(|c| c["name"].as_str() == Some(container))
            .expect("the container");
        return c["args"]
            .as_sequence()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
    }
    panic!("no StatefulSet {name} in the rendered manifests");
}
