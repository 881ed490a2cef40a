//! The orgkey gateway, the main job: `cargo run --example gateway -- --help`.
//!
//! Everything it does is in the library (`orgkey::gateway`, feature `gateway`): the composition
//! root on the embedded SQLite store, a server with limits, the demo API or a reverse proxy.
//! The same program is the `orgkey-gateway` binary.

fn main() -> std::process::ExitCode {
    orgkey::gateway::main()
}
