//! Kubernetes Events on the agent's pod, through kube-rs: one per backup
//! success or failure and one per verify finding, so `kubectl describe pod`
//! and `kubectl get events` show them next to PostgreSQL's own.
//!
//! Thin on purpose: one `create` of an `events.k8s.io/v1` Event, the only
//! permission the Role grants. Outside a cluster (no
//! `KUBERNETES_SERVICE_HOST`) nothing is recorded. A failed create is logged,
//! never allowed to fail the backup or verify it reports on.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};

use crate::catalog::backup::BackupRecord;
use crate::verify::VerifyReport;

/// `reportingController`: who wrote the Event.
pub const CONTROLLER: &str = "pitr-agent.dev/daemon";

/// At most this many verify findings become Events per run; the rest are
/// counted in one more, so a broken repository cannot flood the API server.
const MAX_FINDING_EVENTS: usize = 10;

/// The API server's limit on an Event's note.
const NOTE_LIMIT: usize = 1024;

/// Normal or Warning, as Kubernetes spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// A backup committed.
    Normal,
    /// A backup failed, or verify found something.
    Warning,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "Normal",
            Self::Warning => "Warning",
        }
    }
}

/// The pod the Events are about.
#[derive(Debug, Clone)]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Pod uid (downward API `metadata.uid`), if given.
    pub uid: Option<String>,
}

impl PodRef {
    /// From the downward API (`POD_NAME`, `POD_NAMESPACE`, `POD_UID`), with
    /// the hostname and the service account's namespace as fallbacks.
    fn from_env(default_namespace: &str) -> Option<Self> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Some(Self {
            name: var("POD_NAME").or_else(|| var("HOSTNAME"))?,
            namespace: var("POD_NAMESPACE").unwrap_or_else(|| default_namespace.to_owned()),
            uid: var("POD_UID"),
        })
    }
}

/// Writes Events about one pod.
#[derive(Clone)]
pub struct EventRecorder {
    api: Api<Event>,
    pod: PodRef,
}

impl std::fmt::Debug for EventRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventRecorder")
            .field("pod", &self.pod)
            .finish_non_exhaustive()
    }
}

impl EventRecorder {
    /// Events about `pod`, written through `client`.
    #[must_use]
    pub fn new(client: Client, pod: PodRef) -> Self {
        Self {
            api: Api::namespaced(client, &pod.namespace),
            pod,
        }
    }

    /// A recorder when running in a pod, `None` elsewhere (or when the
    /// in-cluster configuration cannot be read, which is logged).
    pub async fn from_env() -> Option<Self> {
        std::env::var_os("KUBERNETES_SERVICE_HOST")?;
        let client = match Client::try_default().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "in a pod, but cannot configure the Kubernetes client; no Events will be recorded");
                return None;
            }
        };
        let pod = PodRef::from_env(client.default_namespace())?;
        tracing::info!(pod = %pod.name, namespace = %pod.namespace, "recording Kubernetes Events");
        Some(Self::new(client, pod))
    }

    /// The Event for `reason` and `note`, as it is sent.
    #[must_use]
    pub fn event(
        &self,
        kind: EventType,
        reason: &str,
        action: &str,
        note: &str,
        now: Timestamp,
    ) -> Event {
        let mut note = note.to_owned();
        if note.len() > NOTE_LIMIT {
            let mut end = NOTE_LIMIT - 3;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
            note.push_str("...");
        }
        Event {
            metadata: ObjectMeta {
                // kubectl's convention: <object>.<unique hex>.
                name: Some(format!("{}.{:x}", self.pod.name, now.as_nanosecond())),
                namespace: Some(self.pod.namespace.clone()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(kind.as_str().to_owned()),
            reason: Some(reason.to_owned()),
            action: Some(action.to_owned()),
            note: Some(note),
            regarding: Some(ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Pod".to_owned()),
                name: Some(self.pod.name.clone()),
                namespace: Some(self.pod.namespace.clone()),
                uid: self.pod.uid.clone(),
                ..ObjectReference::default()
            }),
            reporting_controller: Some(CONTROLLER.to_owned()),
            reporting_instance: Some(self.pod.name.clone()),
            ..Event::default()
        }
    }

    /// Creates the Event.
    ///
    /// # Errors
    /// The API server refused it or could not be reached.
    pub async fn publish(
        &self,
        kind: EventType,
        reason: &str,
        action: &str,
        note: &str,
    ) -> Result<Event, kube::Error> {
        let event = self.event(kind, reason, action, note, Timestamp::now());
        self.api.create(&PostParams::default(), &event).await
    }

    /// Creates the Event; a failure is logged with the fix, never returned.
    pub async fn record(&self, kind: EventType, reason: &str, action: &str, note: &str) {
        if let Err(e) = self.publish(kind, reason, action, note).await {
            let hint = match &e {
                kube::Error::Api(s) if s.code == 403 => {
                    "; grant the pod's service account `create` on events.k8s.io events in its namespace (manifests/base/postgres/rbac.yaml)"
                }
                _ => "",
            };
            tracing::warn!(reason, error = %e, "cannot record a Kubernetes Event{hint}");
        }
    }
}

/// The reports the daemon and the one-shot commands share.
impl EventRecorder {
    /// `BackupSucceeded` or `BackupFailed`.
    pub async fn backup_outcome<E: std::fmt::Display + Sync>(
        &self,
        result: &Result<BackupRecord, E>,
    ) {
        match result {
            Ok(record) => {
                let note = format!(
                    "backup {} committed: {} stored ({} raw) in {}, WAL {}..{}",
                    record.id,
                    crate::report::bytes(record.stored_bytes),
                    crate::report::bytes(record.raw_bytes),
                    crate::report::age(record.duration()),
                    record.first_wal,
                    record.last_wal,
                );
                self.record(EventType::Normal, "BackupSucceeded", "Backup", &note)
                    .await;
            }
            Err(e) => {
                let note = format!("backup failed: {e:#}");
                self.record(EventType::Warning, "BackupFailed", "Backup", &note)
                    .await;
            }
        }
    }

    /// `RehearsalSucceeded` or `RehearsalFailed`.
    pub async fn rehearsal_outcome(&self, record: &crate::rehearse::RehearsalRecord) {
        let note = crate::rehearse::summary(record);
        if record.ok {
            self.record(EventType::Normal, "RehearsalSucceeded", "Rehearse", &note)
                .await;
        } else {
            self.record(EventType::Warning, "RehearsalFailed", "Rehearse", &note)
                .await;
        }
    }

    /// One `VerifyFinding` per finding, at most [`MAX_FINDING_EVENTS`] and a
    /// count of the rest; `VerifyFailed` when verify could not run at all.
    pub async fn verify_outcome<E: std::fmt::Display + Sync>(
        &self,
        result: &Result<VerifyReport, E>,
    ) {
        let findings = match result {
            Ok(report) => &report.findings,
            Err(e) => {
                let note = format!("verify could not run: {e:#}");
                self.record(EventType::Warning, "VerifyFailed", "Verify", &note)
                    .await;
                return;
            }
        };
        for f in findings.iter().take(MAX_FINDING_EVENTS) {
            let note = format!("{} {}: {}", f.severity.as_str(), f.subject, f.message);
            self.record(EventType::Warning, "VerifyFinding", "Verify", &note)
                .await;
        }
        if findings.len() > MAX_FINDING_EVENTS {
            let note = format!(
                "{} more verify findings; run `pitr-agent verify` for all of them",
                findings.len() - MAX_FINDING_EVENTS
            );
            self.record(EventType::Warning, "VerifyFinding", "Verify", &note)
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    //! Against recorded API traffic: the request pitr-agent sends and the
    //! responses the API server gives (`tests/fixtures/kube/`).
    use super::*;
    use http::{Method, Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::Value;
    use tower_test::mock;

    fn fixture(name: &str) -> Value {
        let path = format!("{}/tests/fixtures/kube/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn recorder() -> (EventRecorder, mock::Handle<Request<Body>, Response<Body>>) {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "odoo");
        let pod = PodRef {
            namespace: "odoo".into(),
            name: "postgres-0".into(),
            uid: Some("5c1a3f0e-8a0b-4a49-9d2e-0c3f1b7e6a10".into()),
        };
        (EventRecorder::new(client, pod), handle)
    }

    /// Answers one request with `status` and `body`, and returns the request.
    async fn answer(
        handle: &mut mock::Handle<Request<Body>, Response<Body>>,
        status: StatusCode,
        body: &Value,
    ) -> (Method, String, Value) {
        let (request, send) = handle.next_request().await.expect("a request");
        let method = request.method().clone();
        let uri = request.uri().to_string();
        let bytes = request.into_body().collect_bytes().await.expect("body");
        let sent: Value = serde_json::from_slice(&bytes).expect("JSON body");
        send.send_response(
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(body).expect("encode")))
                .expect("response"),
        );
        (method, uri, sent)
    }

    /// The two fields that change on every call.
    fn without_clock(mut v: Value) -> Value {
        v["eventTime"] = Value::Null;
        v["metadata"]["name"] = Value::Null;
        v
    }

    #[tokio::test]
    async fn a_backup_event_is_the_recorded_request_and_reads_back_the_created_event() {
        let (rec, mut handle) = recorder();
        let call = tokio::spawn(async move {
            rec.publish(
                EventType::Normal,
                "BackupSucceeded",
                "Backup",
                "backup 20261121T020000Z committed: 84.6 MiB stored in 7.7 s",
            )
            .await
        });
        let created = fixture("create-event.response.json");
        let (method, uri, sent) = answer(&mut handle, StatusCode::CREATED, &created).await;
        assert_eq!(method, Method::POST);
        assert_eq!(uri, "/apis/events.k8s.io/v1/namespaces/odoo/events?");
        assert_eq!(
            without_clock(sent.clone()),
            without_clock(fixture("create-event.request.json"))
        );
        let name = sent["metadata"]["name"].as_str().expect("name");
        assert!(name.starts_with("postgres-0."), "{name}");
        let time = sent["eventTime"].as_str().expect("eventTime");
        assert!(time.parse::<Timestamp>().is_ok(), "{time}");
        let event = call.await.expect("join").expect("created");
        assert_eq!(
            event.metadata.uid.as_deref(),
            created["metadata"]["uid"].as_str()
        );
        assert_eq!(event.reason.as_deref(), Some("BackupSucceeded"));
    }

    #[tokio::test]
    async fn a_forbidden_create_is_an_api_error_and_record_swallows_it() {
        let (rec, mut handle) = recorder();
        let rec2 = rec.clone();
        let call = tokio::spawn(async move {
            rec2.publish(EventType::Warning, "BackupFailed", "Backup", "disk full")
                .await
        });
        let forbidden = fixture("create-event.forbidden.json");
        let (_, _, sent) = answer(&mut handle, StatusCode::FORBIDDEN, &forbidden).await;
        assert_eq!(sent["type"], "Warning");
        match call.await.expect("join") {
            Err(kube::Error::Api(s)) => {
                assert_eq!(s.code, 403);
                assert_eq!(s.reason, "Forbidden");
            }
            other => panic!("expected a 403, got {other:?}"),
        }
        // record() logs and returns: the job it reports on carries on.
        let call = tokio::spawn(async move {
            rec.record(EventType::Warning, "BackupFailed", "Backup", "disk full")
                .await;
        });
        answer(&mut handle, StatusCode::FORBIDDEN, &forbidden).await;
        call.await.expect("record returns despite the 403");
    }

    #[test]
    fn long_notes_are_cut_to_the_api_limit_on_a_char_boundary() {
        let (service, _handle) = mock::pair::<Request<Body>, Response<Body>>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let _guard = rt.enter();
        let rec = EventRecorder::new(
            Client::new(service, "odoo"),
            PodRef {
                namespace: "odoo".into(),
                name: "p".into(),
                uid: None,
            },
        );
        let note = "é".repeat(1000);
        let e = rec.event(
            EventType::Warning,
            "VerifyFinding",
            "Verify",
            &note,
            Timestamp::now(),
        );
        let cut = e.note.expect("note");
        assert!(cut.len() <= NOTE_LIMIT, "{}", cut.len());
        assert!(cut.ends_with("..."));
    }

    #[test]
    fn outside_a_cluster_nothing_is_recorded() {
        if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
            return;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        assert!(rt.block_on(EventRecorder::from_env()).is_none());
    }
}
