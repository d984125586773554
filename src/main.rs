fn main() -> std::process::ExitCode {
    bucketfs::run::main()
}
