//! Every catchable signal is forwarded or handled; a signal's origin is what the kernel vouches for.
