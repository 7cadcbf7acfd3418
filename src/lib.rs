//! rbuild: a daemonless, rootless OCI image builder.
//!
//! The binary is thin; this library joins the focused crates: [`rbuild_dag`] (Dockerfile →
//! steps → stage graph), [`rbuild_snapshot`] (layers), [`rbuild_cache`] (the store) and
//! [`rbuild_sandbox`] (namespaces and the RUN sandbox).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod annotations;
pub mod attest;
pub mod build;
pub mod cachesync;
pub mod cli;
pub mod copy;
pub mod ctxhash;
pub mod ignored;
pub mod image;
pub mod index;
pub mod mounts;
pub mod oci_layout;
pub mod output;
pub mod progress;
pub mod registry;
pub mod remote;
pub mod rootfs;
