//! Randomness for nonces, request ids and backoff jitter, from the kernel (`getrandom(2)`).

use std::io;

/// `N` bytes from the kernel's CSPRNG.
pub(crate) fn bytes<const N: usize>() -> io::Result<[u8; N]> {
    let mut out = [0u8; N];
    let mut filled = 0;
    while filled < N {
        let rest = &mut out[filled..];
        // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes for the whole call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        filled += n as usize;
    }
    Ok(out)
}

/// A random u64 for jitter and id prefixes; falls back to the clock if the kernel refuses.
pub(crate) fn u64() -> u64 {
    match bytes::<8>() {
        Ok(b) => u64::from_le_bytes(b),
        Err(_) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            now ^ (u64::from(std::process::id()) << 32)
        }
    }
}

/// A number uniform in `[0, 1)`, for backoff jitter.
pub(crate) fn unit() -> f64 {
    // The top 53 bits fill an f64 mantissa exactly.
    (u64() >> 11) as f64 / (1u64 << 53) as f64
}
