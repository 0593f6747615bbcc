//! Allocator settings for the binaries that train: tensors are large and short-lived, so
//! freed memory is kept mapped for reuse instead of being handed back to the kernel, which
//! would zero fresh pages for it on the next step (measured at a quarter of a MiniLM step).

/// mimalloc (v3, as libmimalloc-sys builds it) options by their position in `mi_option_e`.
const MI_OPTION_ALLOW_LARGE_OS_PAGES: libmimalloc_sys::mi_option_t = 6;
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
const MI_OPTION_ALLOW_THP: libmimalloc_sys::mi_option_t = 43;

/// Keeps freed memory mapped, with large and transparent huge pages off for the whole
/// process. Huge pages cost more than they save here: faulting in and zeroing 2 MiB pages
/// made the first step of a small GPT's training take 10 s instead of 2.5 s and later steps
/// about 10 % longer. mimalloc reserves its first arena (and asks for huge pages on it)
/// before `main` runs, so its own option does not reach that arena; the process-wide
/// `PR_SET_THP_DISABLE` does.
///
/// # Safety
/// Call once at start-up, before other threads exist: mimalloc's options are plain
/// (non-atomic) values that other threads would read while they are written.
pub unsafe fn keep_freed_memory() {
    // SAFETY: no other thread exists yet (the caller's contract), so these plain stores
    // inside mimalloc race with nothing.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_ALLOW_LARGE_OS_PAGES, 0);
        libmimalloc_sys::mi_option_set(MI_OPTION_ALLOW_THP, 0);
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
    }
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_THP_DISABLE takes integer arguments only; a kernel without
    // it returns an error, which changes nothing and is ignored.
    unsafe {
        let (on, unused) = (1 as libc::c_ulong, 0 as libc::c_ulong);
        libc::prctl(libc::PR_SET_THP_DISABLE, on, unused, unused, unused);
    }
}
