fn main() -> std::process::ExitCode {
    bucketfs::cli::main()
}
