//! Executable memory for compiled programs: written while private and writable, then made
//! read-only and executable (never both writable and executable), unmapped on drop.

use std::ptr::NonNull;

/// A page-aligned mapping holding machine code.
pub(crate) struct Code {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is immutable once made executable; it is only read (executed) after
// construction, and unmapped once, on drop.
unsafe impl Send for Code {}
// SAFETY: as above.
unsafe impl Sync for Code {}

impl Code {
    /// Maps `bytes` read-only and executable.
    pub(crate) fn new(bytes: &[u8]) -> std::io::Result<Code> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let len = bytes.len().max(1).next_multiple_of(page);
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing
        // touches no existing memory.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let code = Code {
            ptr: NonNull::new(p.cast()).expect("mmap returned a mapping"),
            len,
        };
        // SAFETY: the mapping is `len >= bytes.len()` writable bytes that nothing else uses.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), code.ptr.as_ptr(), bytes.len()) };
        // SAFETY: changes the protection of our own mapping only.
        if unsafe { libc::mprotect(p, len, libc::PROT_READ | libc::PROT_EXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(code)
    }

    pub(crate) fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Code {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once; no code runs from it any more (the
        // program that owns it is being dropped, so no run holds it).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
