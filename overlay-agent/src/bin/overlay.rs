//! overlay: the command line of the overlay, shaped like `docker network` (see `cli`).

fn main() -> std::process::ExitCode {
    overlay_agent::cli::main()
}
