//! GKM's controller crate: the admission webhook that pins and verifies cache images, and
//! the controller that promotes the verified digest to status and aggregates node status.
//!
//! - [`webhook`]: the admission rules for `gkm.io/resolvedDigest`, their AdmissionReview
//!   answers, and the HTTPS server that serves them.
//! - [`verify`]: what admission asks of signature verification.
//! - [`controller`]: status promotion and node aggregation.
//! - [`metrics`]: the controller's Prometheus metrics.
//! - [`promote`]: the verify-and-promote API: who may call it, and its HTTP answers.
//! - [`pull_secrets`]: caches' `imagePullSecrets`, read into registry credentials.
//! - [`node_credentials`]: `POST /pull-credentials`, a cache's pull credentials for the
//!   agent of a node whose pod mounts it.
//! - [`certs`]: self-minted serving certificates and the webhooks' `caBundle`.
//! - [`run`]: configuration and wiring of the `gkm-controller` binary.

pub mod certs;
pub mod controller;
pub mod metrics;
pub mod node_credentials;
pub mod promote;
pub mod pull_secrets;
pub mod run;
pub mod verify;
pub mod webhook;
