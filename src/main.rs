//! The `loadtape` binary: everything is in the library; this only picks the allocator and
//! hands over to the command line.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    loadtape::cli::main()
}
