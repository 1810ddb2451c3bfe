//! Connections that never authenticate cannot lock the control plane out.
