//! Free space on the file system under a data directory, and the reserve kept on it.
//!
//! Both processes stop taking new data while less than the reserve is free, and answer with a
//! retryable error instead: sled does not recover cleanly from running out of space under
//! itself (it keeps the I/O error until reopened, and can leave its log unreadable), and the
//! reserve leaves room for what drains the data (sealing, acknowledgements, housekeeping).

use std::path::Path;

/// Free bytes (for unprivileged users) and total bytes of the file system holding `dir`.
pub fn space(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct we own; `path` is a valid C string.
    #[allow(unsafe_code)]
    let st = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(path.as_ptr(), &mut st) != 0 {
            return None;
        }
        st
    };
    let unit = st.f_frsize as u64;
    // Some pseudo and FUSE file systems report no blocks at all: unknown, not full.
    if st.f_blocks == 0 || unit == 0 {
        return None;
    }
    Some((st.f_bavail as u64 * unit, st.f_blocks as u64 * unit))
}

/// Free space kept: a twentieth of the file system, at least 8 MiB (two of the largest writes
/// the agent makes at once) and at most 256 MiB.
pub fn reserve(total: u64) -> u64 {
    (total / 20).clamp(8 << 20, 256 << 20)
}

/// `Some((free, reserve))` when writing `size` more bytes under `dir` would eat into the
/// reserve; `None` when there is room (or the file system cannot be asked).
pub fn low(dir: &Path, size: u64) -> Option<(u64, u64)> {
    let (free, total) = space(dir)?;
    let reserve = reserve(total);
    (free < reserve.saturating_add(size)).then_some((free, reserve))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn space_and_reserve() {
        let (free, total) = space(Path::new("/")).unwrap();
        assert!(total > 0 && free <= total);
        assert_eq!(reserve(1 << 20), 8 << 20);
        assert_eq!(reserve(1 << 30), (1 << 30) / 20);
        assert_eq!(reserve(1 << 40), 256 << 20);
        assert!(low(Path::new("/"), u64::MAX / 2).is_some());
        assert!(space(Path::new("/no/such/dir")).is_none());
    }
}
