fn main() -> std::process::ExitCode {
    loadtape::cli::main()
}
