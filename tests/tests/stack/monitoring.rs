//! The alert rules in manifests/monitoring: valid, and each one fires when
//! it should and stays silent when healthy (`promtool test rules`).

use std::process::Command;

use pitr_tests::manifests::{dashboard, monitoring_dir, yaml};
use pitr_tests::which;

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
    let plain = yaml("pitr-alerts.rules.yml");
    let crd = yaml("prometheusrule.yaml");
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

/// Grafana's provisioned alert rules are the Prometheus rules: same names,
/// PromQL, `for`, labels and annotations, and a condition that fires for
/// every series the expression returns (no data is healthy, as in Prometheus).
#[test]
fn the_grafana_alert_rules_match_the_prometheus_rules() {
    let plain = yaml("pitr-alerts.rules.yml");
    let grafana = yaml("grafana/pitr-alert-rules.yaml");
    assert_eq!(grafana["apiVersion"].as_u64(), Some(1));
    let prom_rules = plain["groups"][0]["rules"].as_sequence().expect("rules");
    let graf_rules = grafana["groups"][0]["rules"].as_sequence().expect("rules");
    assert_eq!(
        graf_rules.len(),
        prom_rules.len(),
        "one Grafana rule per Prometheus alert"
    );
    for prom in prom_rules {
        let name = prom["alert"].as_str().expect("alert name");
        let graf = graf_rules
            .iter()
            .find(|g| g["title"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no Grafana rule titled {name}"));
        let data = graf["data"].as_sequence().expect("data");
        let query = data
            .iter()
            .find(|d| d["refId"].as_str() == Some("A"))
            .expect("query A");
        assert_eq!(
            query["model"]["expr"], prom["expr"],
            "{name}: expression drifted"
        );
        let condition = graf["condition"].as_str().expect("condition");
        let cond = data
            .iter()
            .find(|d| d["refId"].as_str() == Some(condition))
            .expect("the condition's query");
        assert_eq!(cond["datasourceUid"].as_str(), Some("__expr__"), "{name}");
        assert_eq!(
            cond["model"]["expression"].as_str(),
            Some("$A == $A"),
            "{name}"
        );
        assert_eq!(graf["noDataState"].as_str(), Some("OK"), "{name}");
        let prom_for = prom["for"].as_str().unwrap_or("0s");
        assert_eq!(
            graf["for"].as_str(),
            Some(prom_for),
            "{name}: `for` drifted"
        );
        assert_eq!(graf["labels"], prom["labels"], "{name}: labels drifted");
        assert_eq!(
            graf["annotations"], prom["annotations"],
            "{name}: annotations drifted"
        );
    }
}

/// The dashboard, as a TypeScript constant of `@grafana/schema`'s
/// `Dashboard` type, passes `tsc --noEmit`: unknown keys, wrong types and
/// unknown enum values fail. JSON carries enum values, not TypeScript enum
/// identities, so `Json<T>` maps string enums to their values.
#[test]
fn the_dashboard_type_checks_against_grafana_schema() {
    let dir = pitr_tests::manifests::repo_root().join(".ci/grafana-schema");
    let tsc = dir.join("node_modules/.bin/tsc");
    if !pitr_tests::prerequisite(
        tsc.exists() && dir.join("node_modules/@grafana/schema").exists(),
        "@grafana/schema and typescript (npm ci in .ci/grafana-schema)",
    ) {
        return;
    }
    let json = serde_json::to_string_pretty(&dashboard()).expect("encode");
    let source = format!(
        "import type {{ Dashboard }} from '@grafana/schema';\n\
         type Json<T> = T extends string ? `${{T}}` : T extends readonly (infer E)[] ? Json<E>[] \
         : T extends object ? {{ [K in keyof T]: Json<T[K]> }} : T;\n\
         export const dashboard: Json<Dashboard> = {json};\n"
    );
    std::fs::write(dir.join("dashboard-check.gen.ts"), source).expect("write the check");
    let out = Command::new(&tsc)
        .args(["-p", "."])
        .current_dir(&dir)
        .output()
        .expect("run tsc");
    assert!(
        out.status.success(),
        "the dashboard does not match @grafana/schema:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let panels = dashboard()["panels"].as_array().expect("panels").len();
    assert!(panels >= 10, "{panels} panels");
}
