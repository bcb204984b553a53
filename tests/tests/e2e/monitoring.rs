//! The alert rules in manifests/monitoring: valid, and each one fires when
//! it should and stays silent when healthy (`promtool test rules`).

use std::path::PathBuf;
use std::process::Command;

use pitr_tests::which;

fn monitoring_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/monitoring")
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(monitoring_dir())
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_are_valid_and_their_unit_tests_pass() {
    if !pitr_tests::prerequisite(which("promtool").is_some(), "promtool (Debian prometheus)") {
        return;
    }
    promtool(&["check", "rules", "pitr-alerts.rules.yml"]);
    promtool(&["test", "rules", "pitr-alerts.test.yml"]);
}

#[test]
fn the_prometheus_rule_carries_exactly_the_rules_file() {
    let read = |name: &str| -> serde_yaml_ng::Value {
        let text = std::fs::read_to_string(monitoring_dir().join(name)).expect("read");
        serde_yaml_ng::from_str(&text).expect("valid YAML")
    };
    let plain = read("pitr-alerts.rules.yml");
    let crd = read("prometheusrule.yaml");
    assert_eq!(crd["kind"].as_str(), Some("PrometheusRule"));
    assert_eq!(
        crd["spec"]["groups"], plain["groups"],
        "prometheusrule.yaml drifted"
    );
    let alerts = plain["groups"][0]["rules"]
        .as_sequence()
        .expect("rules")
        .len();
    assert!(alerts >= 7, "{alerts} alerts");
}

/// Every `pitr_*` metric the rules use, for the daemon test to check.
pub(crate) fn metrics_used_by_rules() -> Vec<String> {
    let text = std::fs::read_to_string(monitoring_dir().join("pitr-alerts.rules.yml"))
        .expect("read the rules");
    let mut names: Vec<String> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("pitr_"))
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}
