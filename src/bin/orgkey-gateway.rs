//! The orgkey gateway as an installable binary (`cargo install orgkey`); the same program as
//! `cargo run --example gateway`. See `orgkey::gateway`.

fn main() -> std::process::ExitCode {
    orgkey::gateway::main()
}
