//! The Kubernetes and Docker stack, checked offline: every overlay renders
//! and validates, the seeds' requirements hold in the rendered objects, the
//! alert rules pass their unit tests, the compose files and nginx validate,
//! and the Odoo entrypoint runs against a real PostgreSQL. No API server and
//! no Docker engine: real validators instead. Separate from the agent's
//! end-to-end binary.

mod docker;
mod monitoring;
mod seeds;
mod stack;

use pitr_tests::pg::pg_bin;
