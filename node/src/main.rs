//! The `tidesync` binary: see [`tidesync::cli`].

/// Allocations of at least this many bytes (received frames, batches, redb's page vectors)
/// are mapped on their own and given back to the system when freed. glibc's default starts at
/// 128 KiB but raises itself after each large free, up to 32 MiB, and then keeps up to twice
/// that free in each thread's arena: resident memory twice the heap. Fixed here, a
/// 50,000-object initial sync peaked at about 10 MB less on each side (issue 17).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD_BYTES: libc::c_int = 128 * 1024;

fn main() -> std::process::ExitCode {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocator settings, and runs before any other
    // thread of this process starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
    }
    tidesync::cli::main()
}
