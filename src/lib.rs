//! rbuild: a daemonless, rootless OCI image builder.
