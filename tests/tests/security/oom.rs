//! The OOM killer never picks PID 1; OOM kills are reported as such.
