//! GKM's controller crate: the admission webhook that pins and verifies cache images, and
//! the controller that promotes the verified digest to status and aggregates node status.
//!
//! - [`admission`]: the rules for `gkm.io/resolvedDigest` and their AdmissionReview answers.
//! - [`verify`]: what admission asks of signature verification.
//! - [`server`]: the HTTPS admission server.
//! - [`controller`]: status promotion and node aggregation.
//! - [`run`]: configuration and wiring of the `gkm-controller` binary.

pub mod admission;
pub mod controller;
pub mod run;
pub mod server;
pub mod verify;
