//! GKM's controller crate: the admission webhook that pins and verifies cache images, and
//! the controller that promotes the verified digest to status and aggregates node status.
//!
//! - [`webhook`]: the admission rules for `gkm.io/resolvedDigest`, their AdmissionReview
//!   answers, and the HTTPS server that serves them.
//! - [`verify`]: what admission asks of signature verification.
//! - [`controller`]: status promotion and node aggregation.
//! - [`metrics`]: the controller's Prometheus metrics.
//! - [`promote`]: the verify-and-promote API: who may call it, and its HTTP answers.
//! - [`certs`]: self-minted serving certificates and the webhooks' `caBundle`.
//! - [`run`]: configuration and wiring of the `gkm-controller` binary.

pub mod certs;
pub mod controller;
pub mod metrics;
pub mod promote;
pub mod run;
pub mod verify;
pub mod webhook;
