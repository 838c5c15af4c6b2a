//! The `tidesync` binary: see [`tidesync::cli`].

fn main() -> std::process::ExitCode {
    tidesync::cli::main()
}
