//! Smaller holes: stderr to a regular file, a second shim on a live socket, daemons that leave an exec, clients that never acknowledge.
