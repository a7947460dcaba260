//! `skald`: the operator CLI. See, find, re-drive and cancel sagas in a SQLite or
//! PostgreSQL store (`--db`, `SKALD_DB`), sending operator requests over NATS (`--nats`,
//! `SKALD_NATS`). `skald --help` lists the commands and exit codes; docs/operations.md
//! shows each with its output.
//!
//! This binary knows the checkout saga's definition (for time travel and step names,
//! and to run it with `serve`). A team builds its own with its definitions registered:
//! `skald::cli::Cli::new().register(&my_saga).main()`.
//!
//! ```text
//! cargo run --release --features demo --bin skald -- --db sqlite://skald.db sagas --status failed
//! ```
//!
//! `skald serve` runs an orchestrator node for the checkout saga: it applies replies,
//! wake-ups and operator requests on `--db` and `--nats` until SIGINT or SIGTERM, and
//! starts no sagas (docs/operations.md, "`skald serve`: an orchestrator node"):
//!
//! ```text
//! cargo run --release --features demo --bin skald -- serve \
//!     --db postgres://skald@127.0.0.1:5432/skald --nats nats://127.0.0.1:4222 \
//!     --metrics-addr 0.0.0.0:9464
//! ```

use std::process::ExitCode;

use skald::cli::Cli;
use skald::sagas::checkout::{CheckoutTiming, checkout_definition};

fn main() -> ExitCode {
    let cli = match checkout_definition(CheckoutTiming::default()) {
        Ok(checkout) => Cli::new().register(&checkout),
        Err(e) => {
            eprintln!("skald: the built-in checkout definition is invalid: {e}");
            return ExitCode::FAILURE;
        }
    };
    cli.main()
}
