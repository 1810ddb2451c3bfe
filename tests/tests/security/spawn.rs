//! A spawn never blocks PID 1: a child stopped between fork and execve.
