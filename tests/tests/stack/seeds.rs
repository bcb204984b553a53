//! Seed conformance: the values the operators' requirements name
//! (../shared/seeds 000, 002, 003), read back from the rendered manifests
//! through k8s-openapi's types and from the Docker files. One check per
//! scenario a file can show; changing a value fails the test that names it.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, LimitRange, Namespace, PersistentVolumeClaim, PodSpec, ResourceQuota,
    Secret, Service,
};
use k8s_openapi::api::networking::v1::{Ingress, NetworkPolicy};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde_yaml_ng::Value;

use super::stack::{render, repo_root};

/// One rendered overlay.
struct Rendered {
    overlay: &'static str,
    docs: Vec<Value>,
}

impl Rendered {
    fn load(overlay: &'static str) -> Option<Self> {
        let text = render(overlay)?;
        let docs = serde_yaml_ng::Deserializer::from_str(&text)
            .map(|d| serde::Deserialize::deserialize(d).expect("YAML document"))
            .collect();
        Some(Self { overlay, docs })
    }

    /// The raw object of `kind` whose name is `name` or `name-<hash>`.
    fn raw(&self, kind: &str, name: &str) -> &Value {
        self.docs
            .iter()
            .find(|d| {
                d["kind"].as_str() == Some(kind)
                    && d["metadata"]["name"]
                        .as_str()
                        .is_some_and(|n| n == name || n.starts_with(&format!("{name}-")))
            })
            .unwrap_or_else(|| panic!("{}: no {kind} {name}", self.overlay))
    }

    fn get<T: DeserializeOwned>(&self, kind: &str, name: &str) -> T {
        serde_yaml_ng::from_value(self.raw(kind, name).clone())
            .unwrap_or_else(|e| panic!("{}: {kind} {name}: {e}", self.overlay))
    }

    /// Every pod spec: Deployments, StatefulSets, CronJobs and Jobs.
    fn pod_specs(&self) -> Vec<(String, PodSpec)> {
        let mut out = Vec::new();
        for d in &self.docs {
            let name = format!(
                "{} {}",
                d["kind"].as_str().unwrap_or(""),
                d["metadata"]["name"].as_str().unwrap_or("")
            );
            let spec = match d["kind"].as_str() {
                Some("Deployment" | "StatefulSet" | "Job") => &d["spec"]["template"]["spec"],
                Some("CronJob") => &d["spec"]["jobTemplate"]["spec"]["template"]["spec"],
                _ => continue,
            };
            out.push((
                name,
                serde_yaml_ng::from_value(spec.clone()).expect("PodSpec"),
            ));
        }
        out
    }
}

fn container<'a>(spec: &'a PodSpec, name: &str) -> &'a Container {
    spec.containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn container_ports(c: &Container) -> Vec<i32> {
    c.ports.iter().flatten().map(|p| p.container_port).collect()
}

fn service_ports(s: &Service) -> Vec<i32> {
    s.spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .map(|p| p.port)
        .collect()
}

fn quantity(c: &Container, which: &str, resource: &str) -> String {
    let r = c.resources.as_ref().expect("resources");
    let map = if which == "limits" {
        r.limits.as_ref()
    } else {
        r.requests.as_ref()
    };
    map.and_then(|m| m.get(resource))
        .map(|q| q.0.clone())
        .unwrap_or_default()
}

fn postgres_args(sts: &StatefulSet) -> Vec<String> {
    let spec = sts.spec.template.spec.as_ref().expect("pod");
    container(spec, "postgres").args.clone().unwrap_or_default()
}

fn int(v: Option<&IntOrString>) -> Option<i32> {
    match v? {
        IntOrString::Int(i) => Some(*i),
        IntOrString::String(s) => s.parse().ok(),
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
#[allow(clippy::too_many_lines)]
fn seed_000_kubernetes_infrastructure() {
    let Some(p) = Rendered::load("production") else {
        return;
    };
    let Some(d) = Rendered::load("dev") else {
        return;
    };

    // PostgreSQL StatefulSet: one pod, postgres-0 behind the headless service,
    // persistent volumes for data and for the WAL archive.
    let sts: StatefulSet = p.get("StatefulSet", "postgres");
    let spec = &sts.spec;
    assert_eq!(spec.replicas, Some(1), "StatefulSet creation: a single pod");
    assert_eq!(
        spec.service_name.as_deref(),
        Some("postgres"),
        "stable identity postgres-0.postgres"
    );
    let headless: Service = p.get("Service", "postgres");
    assert_eq!(
        headless.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()),
        Some("None"),
        "PostgreSQL headless Service"
    );
    let claims = spec
        .volume_claim_templates
        .as_ref()
        .expect("volumeClaimTemplates");
    assert!(
        claims
            .iter()
            .any(|c| c.metadata.name.as_deref() == Some("data")),
        "data volume"
    );
    let retention = spec
        .persistent_volume_claim_retention_policy
        .as_ref()
        .expect("retention policy");
    assert_eq!(
        retention.when_deleted.as_deref(),
        Some("Retain"),
        "pod restart keeps the volumes"
    );
    assert_eq!(
        retention.when_scaled.as_deref(),
        Some("Retain"),
        "scaling to 0 keeps the volumes"
    );
    let dev_sts: StatefulSet = d.get("StatefulSet", "postgres");
    let dev_pod = dev_sts.spec.template.spec.as_ref().expect("pod");
    let wal_mount = container(dev_pod, "postgres")
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/wal_archive")
        .expect("the WAL archive volume is mounted at /wal_archive (dev)");
    let wal_claim = dev_pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == wal_mount.name)
        .and_then(|v| v.persistent_volume_claim.as_ref())
        .expect("the WAL archive is a PersistentVolumeClaim");
    let _: PersistentVolumeClaim = d.get("PersistentVolumeClaim", &wal_claim.claim_name);
    let pitr: ConfigMap = p.get("ConfigMap", "pitr-config");
    let repo = pitr
        .data
        .as_ref()
        .and_then(|m| m.get("PITR_REPO"))
        .expect("PITR_REPO");
    assert!(
        repo.starts_with("s3://"),
        "production archives to S3: {repo}"
    );

    // Resource limits: 2000m CPU, 4Gi memory, with requests.
    let pod = spec.template.spec.as_ref().expect("pod");
    let pg = container(pod, "postgres");
    assert_eq!(
        quantity(pg, "limits", "cpu"),
        "2000m",
        "PostgreSQL CPU limit"
    );
    assert_eq!(
        quantity(pg, "limits", "memory"),
        "4Gi",
        "PostgreSQL memory limit"
    );
    assert!(
        !quantity(pg, "requests", "cpu").is_empty(),
        "requests for scheduling"
    );

    // Health probes.
    assert!(pg.readiness_probe.is_some(), "PostgreSQL readiness probe");
    let liveness = pg
        .liveness_probe
        .as_ref()
        .expect("PostgreSQL liveness probe");
    assert!(
        liveness.failure_threshold.unwrap_or(3) >= 3,
        "fails after retries"
    );

    // WAL archiving through pitr-agent (seed 003 values, used here too).
    let args = postgres_args(&sts).join(" ");
    for setting in [
        "wal_level=replica",
        "archive_mode=on",
        "archive_timeout=300",
        "archive_command=/pitr/bin/pitr-agent wal-push %p",
    ] {
        assert!(
            args.contains(setting),
            "postgres runs with {setting}: {args}"
        );
    }
    let init = pod.init_containers.as_ref().expect("init containers");
    assert!(
        init.iter().any(|c| c
            .command
            .iter()
            .flatten()
            .any(|a| a == "/pitr/bin/pitr-agent")),
        "an init container installs pitr-agent into /pitr/bin"
    );
    let agent = container(pod, "pitr-agent");
    // Issue 12: the repository is created by `pitr-agent init` in an init
    // container that reaches it as the agent does (same volume, same
    // credentials), never by a push; in both overlays.
    for (overlay, r) in [("production", &p), ("dev", &d)] {
        let sts: StatefulSet = r.get("StatefulSet", "postgres");
        let pod = sts.spec.template.spec.as_ref().expect("pod");
        let agent = container(pod, "pitr-agent");
        let init = pod
            .init_containers
            .iter()
            .flatten()
            .find(|c| c.args.as_deref() == Some(&["init".to_owned()][..]))
            .unwrap_or_else(|| panic!("{overlay}: an init container runs `pitr-agent init`"));
        let mounts = |c: &Container| -> Vec<String> {
            c.volume_mounts
                .iter()
                .flatten()
                .map(|m| format!("{}:{}", m.name, m.mount_path))
                .collect()
        };
        let sources = |c: &Container| -> Vec<String> {
            c.env_from
                .iter()
                .flatten()
                .filter_map(|e| {
                    e.secret_ref
                        .as_ref()
                        .map(|s| format!("secret {}", s.name))
                        .or_else(|| {
                            e.config_map_ref
                                .as_ref()
                                .map(|m| format!("configmap {}", m.name))
                        })
                })
                .collect()
        };
        for m in mounts(agent)
            .iter()
            .filter(|m| m.ends_with(":/wal_archive"))
        {
            assert!(mounts(init).contains(m), "{overlay}: init mounts {m}");
        }
        for source in sources(agent) {
            assert!(
                sources(init).contains(&source),
                "{overlay}: init reads the agent's {source}"
            );
        }
    }
    assert_eq!(
        agent
            .args
            .as_ref()
            .and_then(|a| a.first())
            .map(String::as_str),
        Some("daemon")
    );
    let agent_ports = container_ports(agent);
    assert_eq!(agent_ports, [9188], "the agent's metrics port");

    // Monitoring: postgres_exporter on 9187, ServiceMonitor and PodMonitor.
    let exporter = container(pod, "postgres-exporter");
    let ports = container_ports(exporter);
    assert_eq!(ports, [9187], "postgres_exporter on 9187");
    let sm = p.raw("ServiceMonitor", "postgres");
    assert_eq!(
        sm["spec"]["endpoints"][0]["port"].as_str(),
        Some("pg-metrics")
    );
    let pm = p.raw("PodMonitor", "pitr-agent");
    assert_eq!(
        pm["spec"]["podMetricsEndpoints"][0]["relabelings"][0]["replacement"].as_str(),
        Some("pitr-agent"),
        "job=\"pitr-agent\", as PitrAgentDown expects"
    );
    let _ = p.raw("PrometheusRule", "pitr-agent");
    let _ = p.raw("ConfigMap", "pitr-grafana-dashboard");

    // Odoo Deployment: 2 replicas, one at a time, gated by readiness.
    let odoo: Deployment = p.get("Deployment", "odoo");
    let ds = &odoo.spec;
    assert_eq!(ds.replicas, Some(2), "default 2 replicas");
    let ru = ds
        .strategy
        .as_ref()
        .and_then(|s| s.rolling_update.as_ref())
        .expect("rolling update");
    assert_eq!(int(ru.max_surge.as_ref()), Some(1), "maxSurge 1");
    assert_eq!(
        int(ru.max_unavailable.as_ref()),
        Some(0),
        "maxUnavailable 0"
    );
    assert!(
        ds.progress_deadline_seconds.is_some(),
        "a failed rollout stops and is reported"
    );
    let opod = ds.template.spec.as_ref().expect("pod");
    assert!(
        opod.topology_spread_constraints.is_some(),
        "pods spread across nodes"
    );
    let oc = container(opod, "odoo");
    let ready = oc
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .expect("readiness");
    assert!(
        ready
            .path
            .as_deref()
            .unwrap_or("")
            .starts_with("/web/health"),
        "readiness on /web/health"
    );
    let oports = container_ports(oc);
    assert_eq!(oports, [8069, 8072]);

    // Shared filestore: ReadWriteMany, mounted by every replica.
    let fs: PersistentVolumeClaim = p.get("PersistentVolumeClaim", "odoo-filestore");
    assert_eq!(
        fs.spec.as_ref().and_then(|s| s.access_modes.clone()),
        Some(vec!["ReadWriteMany".to_owned()]),
        "filestore is ReadWriteMany"
    );
    assert!(
        oc.volume_mounts
            .iter()
            .flatten()
            .any(|m| m.mount_path == "/var/lib/odoo"),
        "the filestore is mounted at /var/lib/odoo"
    );

    // ConfigMap as environment; credentials in a Secret, rotated by name.
    let oconf: ConfigMap = p.get("ConfigMap", "odoo-config");
    let data = oconf.data.as_ref().expect("odoo-config data");
    assert_eq!(data.get("PROXY_MODE").map(String::as_str), Some("True"));
    assert!(
        data.contains_key("ODOO_WORKERS"),
        "worker count in the ConfigMap"
    );
    assert!(
        oc.env_from.iter().flatten().any(|e| e
            .config_map_ref
            .as_ref()
            .is_some_and(|r| r.name.starts_with("odoo-config"))),
        "Odoo reads odoo-config as environment"
    );
    // dev: a generated Secret whose name carries a content hash, so a
    // rotation renames it and rolls its users.
    let secret: Secret = d.get("Secret", "postgres-credentials");
    let keys = secret.data.as_ref().expect("base64 data");
    assert!(
        keys.contains_key("postgres-password"),
        "the database password"
    );
    let secret_name = secret.metadata.name.clone().expect("name");
    assert_ne!(
        secret_name, "postgres-credentials",
        "a content hash in the name rolls the pods on rotation"
    );
    // production: the same Secret, kept in sync from the store.
    let es = p.raw("ExternalSecret", "postgres-credentials");
    assert_eq!(
        es["spec"]["target"]["name"].as_str(),
        Some("postgres-credentials")
    );
    assert!(
        p.docs.iter().all(|d| d["kind"].as_str() != Some("Secret")),
        "no Secret in git for production"
    );
    for (r, name) in [(&d, secret_name.as_str()), (&p, "postgres-credentials")] {
        let users: Vec<String> = r
            .pod_specs()
            .into_iter()
            .filter(|(_, s)| {
                serde_json::to_string(s)
                    .expect("json")
                    .contains(&format!("\"{name}\""))
            })
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            users,
            [
                "Deployment odoo",
                "StatefulSet postgres",
                "CronJob pitr-backup"
            ],
            "{}: only the pods that need the credentials reference them",
            r.overlay
        );
    }

    // Services.
    let osvc: Service = p.get("Service", "odoo");
    let ss = osvc.spec.as_ref().expect("spec");
    assert_eq!(ss.type_.as_deref(), Some("ClusterIP"));
    let sports = service_ports(&osvc);
    assert_eq!(sports, [8069, 8072], "HTTP and longpolling");

    // Ingress: wildcard host, TLS by cert-manager, websocket/longpolling to 8072, 100m bodies.
    let ing: Ingress = p.get("Ingress", "odoo");
    let ann = ing.metadata.annotations.as_ref().expect("annotations");
    assert_eq!(
        ann.get("nginx.ingress.kubernetes.io/proxy-body-size")
            .map(String::as_str),
        Some("100m")
    );
    assert!(
        ann.contains_key("nginx.ingress.kubernetes.io/proxy-read-timeout"),
        "long requests"
    );
    assert!(
        ann.contains_key("cert-manager.io/cluster-issuer"),
        "cert-manager provisions TLS"
    );
    let ispec = ing.spec.as_ref().expect("spec");
    let rule = &ispec.rules.as_ref().expect("rules")[0];
    assert_eq!(
        rule.host.as_deref(),
        Some("*.loomworks.app"),
        "wildcard subdomains"
    );
    let tls_hosts = ispec.tls.as_ref().expect("tls")[0]
        .hosts
        .clone()
        .unwrap_or_default();
    assert!(
        tls_hosts.iter().any(|h| h == "*.loomworks.app"),
        "wildcard TLS"
    );
    let cert = p.raw("Certificate", "loomworks-wildcard");
    assert_eq!(
        cert["spec"]["dnsNames"][0].as_str(),
        Some("*.loomworks.app")
    );
    let paths = &rule.http.as_ref().expect("http").paths;
    for path in ["/websocket", "/longpolling"] {
        let port = paths
            .iter()
            .find(|p| p.path.as_deref() == Some(path))
            .and_then(|p| p.backend.service.as_ref())
            .and_then(|s| s.port.as_ref())
            .unwrap_or_else(|| panic!("{path} route"));
        let number = ss
            .ports
            .iter()
            .flatten()
            .find(|sp| sp.name.is_some() && sp.name == port.name)
            .map(|sp| sp.port);
        assert_eq!(number, Some(8072), "{path} goes to 8072");
    }

    // HPA: 2-10 replicas, CPU 70 %, memory 80 %, 5-minute 10 %-per-minute scale-down.
    let hpa: HorizontalPodAutoscaler = p.get("HorizontalPodAutoscaler", "odoo");
    let hs = &hpa.spec;
    assert_eq!(
        (hs.min_replicas, hs.max_replicas),
        (Some(2), 10),
        "2-10 replicas"
    );
    let target = |name: &str| {
        hs.metrics
            .iter()
            .flatten()
            .filter_map(|m| m.resource.as_ref())
            .find(|r| r.name == name)
            .and_then(|r| r.target.average_utilization)
    };
    assert_eq!(target("cpu"), Some(70), "scale up above 70 % CPU");
    assert_eq!(target("memory"), Some(80), "scale up above 80 % memory");
    let down = hs
        .behavior
        .as_ref()
        .and_then(|b| b.scale_down.as_ref())
        .expect("scaleDown");
    assert_eq!(
        down.stabilization_window_seconds,
        Some(300),
        "5-minute stabilization"
    );
    let policy = &down.policies.as_ref().expect("policies")[0];
    assert_eq!(
        (policy.type_.as_str(), policy.value, policy.period_seconds),
        ("Percent", 10, 60)
    );

    // PDB: at least one Odoo pod.
    let pdb: PodDisruptionBudget = p.get("PodDisruptionBudget", "odoo");
    assert_eq!(
        int(pdb.spec.as_ref().and_then(|s| s.min_available.as_ref())),
        Some(1)
    );

    // Network policies.
    let deny: NetworkPolicy = p.get("NetworkPolicy", "default-deny-all");
    let dspec = deny.spec.as_ref().expect("spec");
    assert!(
        dspec
            .pod_selector
            .as_ref()
            .is_none_or(|s| s.match_labels.is_none() && s.match_expressions.is_none())
    );
    assert_eq!(
        dspec.policy_types.clone(),
        Some(vec!["Ingress".into(), "Egress".into()])
    );
    let pgnp: NetworkPolicy = p.get("NetworkPolicy", "postgres");
    let rules = pgnp
        .spec
        .as_ref()
        .and_then(|s| s.ingress.clone())
        .expect("ingress");
    let on_5432: Vec<_> = rules
        .iter()
        .filter(|r| {
            r.ports
                .iter()
                .flatten()
                .any(|p| int(p.port.as_ref()) == Some(5432))
        })
        .collect();
    assert_eq!(on_5432.len(), 1);
    let from: Vec<String> = on_5432[0]
        .from
        .iter()
        .flatten()
        .filter_map(|f| {
            f.pod_selector
                .as_ref()?
                .match_labels
                .as_ref()?
                .get("app.kubernetes.io/name")
                .cloned()
        })
        .collect();
    assert_eq!(
        from,
        ["odoo", "pitr-backup"],
        "only Odoo (and the backup job) reach PostgreSQL"
    );
    let onp: NetworkPolicy = p.get("NetworkPolicy", "odoo");
    let oin = &onp
        .spec
        .as_ref()
        .and_then(|s| s.ingress.clone())
        .expect("ingress")[0];
    let oports: Vec<i32> = oin
        .ports
        .iter()
        .flatten()
        .filter_map(|p| int(p.port.as_ref()))
        .collect();
    assert_eq!(
        oports,
        [8069, 8072],
        "the ingress controller reaches 8069 and 8072"
    );
    let ns = oin.from.as_ref().expect("from")[0]
        .namespace_selector
        .as_ref()
        .and_then(|s| s.match_labels.as_ref())
        .and_then(|l| l.get("kubernetes.io/metadata.name"))
        .cloned();
    assert_eq!(ns.as_deref(), Some("ingress-nginx"));

    // Backup CronJob: 02:00 UTC, no overlap, backup then prune then verify.
    let cj: CronJob = p.get("CronJob", "pitr-backup");
    let cs = &cj.spec;
    assert_eq!(cs.schedule, "0 2 * * *", "daily at 2:00");
    assert_eq!(cs.time_zone.as_deref(), Some("Etc/UTC"), "in UTC");
    assert_eq!(cs.concurrency_policy.as_deref(), Some("Forbid"));
    let script = cs
        .job_template
        .spec
        .as_ref()
        .and_then(|j| j.template.spec.as_ref())
        .map(|s| {
            container(s, "backup")
                .args
                .clone()
                .unwrap_or_default()
                .join("\n")
        });
    let script = script.expect("backup script");
    let order: Vec<usize> = ["pitr-agent backup", "pitr-agent prune", "pitr-agent verify"]
        .iter()
        .map(|c| {
            script
                .find(c)
                .unwrap_or_else(|| panic!("the backup job runs {c}"))
        })
        .collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "backup, then prune, then verify"
    );
    cronjob_script_runs_every_step(&script);

    // Quotas and defaults.
    let quota: ResourceQuota = p.get("ResourceQuota", "loomworks-quota");
    let hard = quota
        .spec
        .as_ref()
        .and_then(|s| s.hard.clone())
        .expect("hard");
    for key in ["limits.cpu", "limits.memory", "requests.storage"] {
        assert!(hard.contains_key(key), "the quota caps {key}");
    }
    let lr: LimitRange = p.get("LimitRange", "loomworks-limits");
    let c = lr
        .spec
        .as_ref()
        .expect("spec")
        .limits
        .iter()
        .find(|l| l.type_ == "Container")
        .expect("Container limits");
    assert!(
        c.default.is_some() && c.default_request.is_some(),
        "default requests and limits"
    );

    // Pod security: restricted namespace; non-root, no escalation, no capabilities.
    for r in [&p, &d] {
        let ns: Namespace = r.get("Namespace", "loomworks");
        let labels = ns.metadata.labels.clone().unwrap_or_default();
        assert_eq!(
            labels
                .get("pod-security.kubernetes.io/enforce")
                .map(String::as_str),
            Some("restricted")
        );
        check_pod_security(r);
    }
}

fn check_pod_security(r: &Rendered) {
    let exceptions: Vec<String> = r
        .docs
        .iter()
        .filter(|d| {
            d["metadata"]["annotations"]
                .as_mapping()
                .into_iter()
                .flatten()
                .any(|(_, v)| v.as_str().is_some_and(|v| v.starts_with("CKV_K8S_22=")))
        })
        .map(|d| {
            format!(
                "{} {}",
                d["kind"].as_str().unwrap_or(""),
                d["metadata"]["name"].as_str().unwrap_or("")
            )
        })
        .collect();
    for (name, spec) in r.pod_specs() {
        let psc = spec
            .security_context
            .as_ref()
            .unwrap_or_else(|| panic!("{name}: securityContext"));
        assert_eq!(
            psc.run_as_non_root,
            Some(true),
            "{}: {name} runs as non-root",
            r.overlay
        );
        assert_eq!(
            psc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
            Some("RuntimeDefault"),
            "{}: {name} seccomp",
            r.overlay
        );
        for c in spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
        {
            let sc = c
                .security_context
                .as_ref()
                .unwrap_or_else(|| panic!("{name}/{}", c.name));
            assert_eq!(
                sc.allow_privilege_escalation,
                Some(false),
                "{name}/{}",
                c.name
            );
            if sc.read_only_root_filesystem != Some(true) {
                // Allowed only where the program needs it, said on the object.
                assert!(
                    exceptions.iter().any(|e| e == &name),
                    "{}: {name}/{} has a writable root filesystem and no CKV_K8S_22 reason",
                    r.overlay,
                    c.name
                );
            }
            let drop = sc
                .capabilities
                .as_ref()
                .and_then(|c| c.drop.clone())
                .unwrap_or_default();
            assert_eq!(drop, ["ALL"], "{name}/{} drops every capability", c.name);
        }
    }
}

#[test]
fn seed_001_keycloak_rbac_and_sizing() {
    let Some(p) = Rendered::load("production") else {
        return;
    };
    let kc: Deployment = p.get("Deployment", "keycloak");
    let pod = kc.spec.template.spec.clone().expect("pod");
    let c = container(&pod, "keycloak");
    let env = |k: &str| {
        c.env
            .iter()
            .flatten()
            .find(|e| e.name == k)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(
        env("KC_DB").as_deref(),
        Some("postgres"),
        "Keycloak on the stack's PostgreSQL"
    );
    assert_eq!(
        env("KC_HOSTNAME").as_deref(),
        Some("https://auth.loomworks.app")
    );
    assert!(
        c.readiness_probe.is_some() && c.liveness_probe.is_some(),
        "Keycloak health checks"
    );
    let svc: Service = p.get("Service", "keycloak");
    assert_eq!(service_ports(&svc), [8080]);
    let ing: Ingress = p.get("Ingress", "keycloak");
    let host = ing
        .spec
        .as_ref()
        .and_then(|s| s.rules.as_ref())
        .and_then(|r| r[0].host.clone());
    assert_eq!(
        host.as_deref(),
        Some("auth.loomworks.app"),
        "auth domain routed to Keycloak"
    );
    let np: NetworkPolicy = p.get("NetworkPolicy", "postgres-from-keycloak");
    assert!(
        np.spec.is_some(),
        "Keycloak reaches PostgreSQL through its own policy"
    );
    // Sizing: Odoo CPU 2 / memory 4Gi; PostgreSQL storage at least 20Gi.
    let odoo: Deployment = p.get("Deployment", "odoo");
    let oc = container(odoo.spec.template.spec.as_ref().expect("pod"), "odoo").clone();
    assert_eq!(
        (
            quantity(&oc, "limits", "cpu"),
            quantity(&oc, "limits", "memory")
        ),
        ("2000m".into(), "4Gi".into())
    );
    let sts: StatefulSet = p.get("StatefulSet", "postgres");
    let data = sts.spec.volume_claim_templates.as_ref().expect("claims")[0].clone();
    let storage = data
        .spec
        .and_then(|s| s.resources)
        .and_then(|r| r.requests)
        .and_then(|r| r.get("storage").map(|q| q.0.clone()));
    assert_eq!(storage.as_deref(), Some("20Gi"), "20 GB minimum");
    // RBAC for people: operators and viewers, neither reads Secrets.
    for role in ["loomworks-operator", "loomworks-viewer"] {
        let r = p.raw("Role", role);
        let text = serde_yaml_ng::to_string(&r["rules"]).expect("yaml");
        assert!(
            !text.contains("secrets"),
            "{role} must not read Secrets:\n{text}"
        );
        let _ = p.raw("RoleBinding", &format!("{role}s"));
    }
    // The workloads' own service account may only create Events.
    let events = p.raw("Role", "pitr-agent-events");
    assert_eq!(events["rules"].as_sequence().map(Vec::len), Some(1));
    assert_eq!(events["rules"][0]["verbs"][0].as_str(), Some("create"));
    assert_eq!(events["rules"][0]["resources"][0].as_str(), Some("events"));
}

#[test]
fn seed_004_external_secrets() {
    let Some(p) = Rendered::load("production") else {
        return;
    };
    for name in [
        "postgres-credentials",
        "pitr-s3-credentials",
        "keycloak-credentials",
    ] {
        let es = p.raw("ExternalSecret", name);
        assert_eq!(
            es["spec"]["target"]["name"].as_str(),
            Some(name),
            "{name} synced from the store"
        );
        assert_eq!(es["spec"]["secretStoreRef"]["name"].as_str(), Some("vault"));
        assert!(
            es["spec"]["refreshInterval"].as_str().is_some(),
            "{name} refreshes (rotation)"
        );
    }
    for kind in ["Deployment", "StatefulSet"] {
        for d in p.docs.iter().filter(|d| d["kind"].as_str() == Some(kind)) {
            assert_eq!(
                d["metadata"]["annotations"]["reloader.stakater.com/auto"].as_str(),
                Some("true"),
                "{kind} {:?} rolls when its Secret rotates",
                d["metadata"]["name"]
            );
        }
    }
}

#[test]
fn seed_002_namespace_per_instance() {
    let Some(t) = Rendered::load("tenant-example") else {
        return;
    };
    let ns: Namespace = t.get("Namespace", "instance-abc123xy");
    let labels = ns.metadata.labels.clone().unwrap_or_default();
    for (k, v) in [
        ("app.kubernetes.io/part-of", "platxa-platform"),
        ("app.kubernetes.io/managed-by", "instance-manager"),
        ("app.kubernetes.io/instance", "abc123xy"),
        ("platxa.io/instance-id", "abc123xy"),
        ("platxa.io/status", "active"),
        ("pod-security.kubernetes.io/enforce", "restricted"),
    ] {
        assert_eq!(labels.get(k).map(String::as_str), Some(v), "label {k}");
    }
    let dep: Deployment = t.get("Deployment", "odoo");
    assert_eq!(dep.metadata.name.as_deref(), Some("odoo-abc123xy"));
    assert_eq!(dep.spec.replicas, Some(1), "1 replica when awake");
    let pod = dep.spec.template.spec.clone().expect("pod");
    let c = container(&pod, "odoo");
    // Tier "pro": 1Gi, 500m-2000m, 4 workers.
    assert_eq!(quantity(c, "limits", "memory"), "1024Mi");
    assert_eq!(quantity(c, "requests", "cpu"), "500m");
    assert_eq!(quantity(c, "limits", "cpu"), "2000m");
    let workers = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "ODOO_WORKERS")
        .and_then(|e| e.value.clone());
    assert_eq!(workers.as_deref(), Some("4"), "pro tier workers");
    let svc: Service = t.get("Service", "odoo");
    let ports = service_ports(&svc);
    assert_eq!(ports, [8069, 8072]);
    let waking: Service = t.get("Service", "waking-service");
    assert_eq!(
        waking.spec.as_ref().and_then(|s| s.type_.as_deref()),
        Some("ExternalName")
    );
    for pvc in ["odoo-addons", "odoo-filestore"] {
        let _: PersistentVolumeClaim = t.get("PersistentVolumeClaim", pvc);
    }
    let _: Secret = t.get("Secret", "odoo-secrets");
    let conf: ConfigMap = t.get("ConfigMap", "odoo-config");
    let data = conf.data.unwrap_or_default();
    assert_eq!(
        data.get("ODOO_TEMPLATE_DB").map(String::as_str),
        Some("template_odoo_17")
    );
    assert!(
        data["DB_HOST"].contains("postgres-system"),
        "the shared PostgreSQL"
    );
    let _: NetworkPolicy = t.get("NetworkPolicy", "default-deny-all");
    let np: NetworkPolicy = t.get("NetworkPolicy", "odoo-instance-policy");
    let spec = np.spec.expect("spec");
    let from_ns = spec.ingress.as_ref().expect("ingress")[0]
        .from
        .as_ref()
        .expect("from")[0]
        .namespace_selector
        .as_ref()
        .and_then(|s| s.match_labels.clone())
        .unwrap_or_default();
    assert_eq!(
        from_ns
            .get("kubernetes.io/metadata.name")
            .map(String::as_str),
        Some("traefik-system")
    );
    let egress_ns: Vec<String> = spec
        .egress
        .iter()
        .flatten()
        .flat_map(|e| e.to.iter().flatten())
        .filter_map(|t| {
            t.namespace_selector
                .as_ref()?
                .match_labels
                .as_ref()?
                .get("kubernetes.io/metadata.name")
                .cloned()
        })
        .collect();
    assert_eq!(
        egress_ns,
        ["kube-system", "postgres-system"],
        "DNS and the database only, besides HTTPS"
    );
    let quota: ResourceQuota = t.get("ResourceQuota", "instance-quota");
    let hard = quota.spec.and_then(|s| s.hard).unwrap_or_default();
    assert_eq!(
        hard.get("services.nodeports").map(|q| q.0.as_str()),
        Some("0"),
        "no NodePort per instance"
    );
    let _: LimitRange = t.get("LimitRange", "instance-limits");
    let job = t.raw("Job", "odoo-db-clone");
    assert!(
        serde_yaml_ng::to_string(job)
            .expect("yaml")
            .contains("TEMPLATE"),
        "cloned from the template"
    );
    check_pod_security(&t);
}

#[test]
fn seed_003_docker_compose_and_nginx() {
    let compose: Value =
        serde_yaml_ng::from_str(&read("docker/docker-compose.yml")).expect("compose YAML");
    let services = &compose["services"];
    for s in ["postgres", "pitr-agent", "redis", "odoo", "nginx"] {
        assert!(services[s].is_mapping(), "the stack runs {s}");
    }
    let healthy = |svc: &str, on: &str| {
        services[svc]["depends_on"][on]["condition"].as_str() == Some("service_healthy")
    };
    assert!(
        healthy("odoo", "postgres"),
        "PostgreSQL is healthy before Odoo starts"
    );
    assert!(
        healthy("nginx", "odoo"),
        "Odoo is healthy before Nginx starts"
    );
    for s in ["postgres", "redis", "nginx"] {
        assert!(
            services[s]["healthcheck"].is_mapping(),
            "{s} has a health check"
        );
    }
    let mounts = |svc: &str| -> Vec<String> {
        services[svc]["volumes"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    };
    assert!(mounts("postgres").contains(&"postgres_data:/var/lib/postgresql/data".to_owned()));
    assert!(mounts("postgres").contains(&"wal_archive:/wal_archive".to_owned()));
    // `pitr-agent init` runs to completion before PostgreSQL first archives.
    assert_eq!(services["pitr-init"]["command"][0].as_str(), Some("init"));
    assert!(mounts("pitr-init").contains(&"wal_archive:/wal_archive".to_owned()));
    assert_eq!(
        services["postgres"]["depends_on"]["pitr-init"]["condition"].as_str(),
        Some("service_completed_successfully"),
        "the repository exists before PostgreSQL archives into it"
    );
    assert!(mounts("odoo").contains(&"odoo_data:/var/lib/odoo".to_owned()));
    for v in ["postgres_data", "odoo_data", "wal_archive"] {
        assert!(compose["volumes"].get(v).is_some(), "named volume {v}");
    }
    let command: Vec<&str> = services["postgres"]["command"]
        .as_sequence()
        .expect("command")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let command = command.join(" ");
    for setting in [
        "wal_level=replica",
        "archive_mode=on",
        "archive_timeout=300",
        "archive_command=pitr-agent wal-push %p",
    ] {
        assert!(
            command.contains(setting),
            "compose postgres runs with {setting}"
        );
    }
    assert!(
        services["odoo"]["ports"]
            .as_sequence()
            .expect("ports")
            .iter()
            .any(|p| p.as_str() == Some("8069:8069")),
        "Odoo on http://localhost:8069"
    );
    for var in [
        "DB_HOST",
        "DB_PORT",
        "DB_USER",
        "DB_PASSWORD",
        "ODOO_ADMIN_PASSWD",
        "PROXY_MODE",
    ] {
        assert!(
            services["odoo"]["environment"].get(var).is_some(),
            "Odoo takes {var}"
        );
    }
    let env_example = read("docker/.env.example");
    assert!(
        !env_example
            .lines()
            .any(|l| l.contains("PASSW") && !l.contains("CHANGE-ME") && !l.starts_with('#')),
        "no real credentials"
    );

    let dev: Value =
        serde_yaml_ng::from_str(&read("docker/docker-compose.dev.yml")).expect("dev YAML");
    let dodoo = &dev["services"]["odoo"];
    assert!(
        dodoo["ports"]
            .as_sequence()
            .expect("ports")
            .iter()
            .any(|p| p.as_str() == Some("5678:5678")),
        "debugpy on 5678"
    );
    assert!(
        dodoo["volumes"]
            .as_sequence()
            .expect("volumes")
            .iter()
            .any(|v| v.as_str().is_some_and(|s| s.ends_with(":/opt/odoo/addons"))),
        "live addons"
    );
    assert_eq!(
        dodoo["deploy"]["resources"]["limits"]["cpus"].as_str(),
        Some("0"),
        "no CPU limit in dev"
    );
    assert_eq!(
        dodoo["deploy"]["resources"]["limits"]["memory"].as_str(),
        Some("0"),
        "no memory limit in dev"
    );

    let dockerfile = read("docker/odoo/Dockerfile");
    assert!(
        dockerfile
            .lines()
            .filter(|l| l.starts_with("FROM "))
            .count()
            >= 2,
        "multi-stage"
    );
    assert!(
        dockerfile.lines().any(|l| l == "USER 1000:1000"),
        "runs as uid 1000"
    );
    assert!(
        dockerfile.contains("HEALTHCHECK") && dockerfile.contains("/web/health"),
        "health check on /web/health"
    );
    assert!(dockerfile.contains("EXPOSE 8069 8072"));
    let wait = read("docker/odoo/wait_for_db.py");
    assert!(
        wait.contains(r#"os.environ.get("DB_WAIT_TIMEOUT", "60")"#),
        "backoff up to 60 s"
    );
    assert!(wait.contains("delay * 2"), "exponential backoff");
    let entry = read("docker/odoo/entrypoint.sh");
    assert!(
        entry.contains(r#""${ODOO_STOP_TIMEOUT:=30}""#),
        "graceful stop within 30 s"
    );

    let nginx = read("docker/nginx/nginx.conf");
    for line in [
        "client_max_body_size 100m;",
        "error_page 413 = @too_large;",
        "proxy_set_header Host $host;",
        "listen 443 ssl http2 default_server;",
        "set $odoo_gevent http://odoo:8072;",
        "set $odoo_http http://odoo:8069;",
        "proxy_set_header Upgrade $http_upgrade;",
    ] {
        assert!(
            nginx.lines().any(|l| l.trim() == line),
            "nginx.conf: {line}"
        );
    }
    for location in ["location /websocket {", "location /longpolling {"] {
        let block = nginx
            .split(location)
            .nth(1)
            .unwrap_or_else(|| panic!("{location}"));
        let block = &block[..block.find('}').expect("end of block")];
        assert!(
            block.contains("proxy_pass $odoo_gevent;"),
            "{location} goes to 8072"
        );
    }
}

/// The CronJob's script, run by bash with a stand-in `pitr-agent` on PATH:
/// a failing step never stops the ones after it (prune must run after a
/// failed backup, or debris is never removed), and the Job fails if any did.
fn cronjob_script_runs_every_step(script: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("calls");
    let stub = dir.path().join("pitr-agent");
    std::fs::write(
        &stub,
        format!(
            "#!/bin/sh\necho \"$1\" >> {}\ncase \" $PITR_FAIL \" in *\" $1 \"*) exit 1;; esac\n",
            log.display()
        ),
    )
    .expect("write the stub");
    std::fs::set_permissions(&stub, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    for (fail, code) in [("", 0), ("backup", 1), ("prune", 1), ("verify", 1)] {
        let _ = std::fs::remove_file(&log);
        let path = format!(
            "{}:{}",
            dir.path().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = std::process::Command::new("bash")
            .args(["-c", script])
            .env("PATH", path)
            .env("PITR_FAIL", fail)
            .env("PITR_RETAIN_DAYS", "14")
            .env("PITR_RETAIN_FULL", "7")
            .output()
            .expect("run bash");
        let calls = std::fs::read_to_string(&log).unwrap_or_default();
        assert_eq!(
            calls.split_whitespace().collect::<Vec<_>>(),
            ["backup", "prune", "verify"],
            "with {fail:?} failing"
        );
        assert_eq!(out.status.code(), Some(code), "with {fail:?} failing");
    }
}
