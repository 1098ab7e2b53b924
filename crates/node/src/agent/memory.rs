//! Keeps the agent's resident memory close to what it uses. The agent is a DaemonSet on
//! every GPU node, so its footprint is paid once per node. With glibc's allocator, memory
//! freed after a burst (the initial list of thousands of caches, a large status write)
//! stays in per-thread arenas; capping the arenas and trimming after bursts returns it.
//! Other C libraries: nothing to do.

/// Caps malloc arenas at two (one per runtime worker). Call first thing in `main`.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const M_ARENA_MAX: i32 = -8;
        // SAFETY: mallopt only changes allocator tuning; called before other threads start
        // allocating, with a parameter and value glibc documents.
        unsafe {
            glibc::mallopt(M_ARENA_MAX, 2);
        }
    }
}

/// Gives free heap pages back to the kernel.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes the allocator's locks itself and may run at any time.
    unsafe {
        glibc::malloc_trim(0);
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    unsafe extern "C" {
        pub fn mallopt(param: i32, value: i32) -> i32;
        pub fn malloc_trim(pad: usize) -> i32;
    }
}
