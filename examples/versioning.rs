//! What `skald replay` says before a deploy that changes the checkout saga
//! (docs/versioning.md walks through it).
//!
//! This is the `skald` operator CLI with two definitions registered: checkout version 1
//! as it runs today, and a version 2 that renames `charge_payment` to `charge`. Run
//! against a store with checkout sagas (the runner's `skald.db`, or the operator demo's):
//!
//! ```text
//! cargo run --example versioning -- --db sqlite://skald.db replay --type checkout --all
//! cargo run --example versioning -- --db sqlite://skald.db replay --type checkout --all --against 2
//! ```
//!
//! The first checks the sagas against the definition they run on (the same path: exit
//! 0); the second asks whether they could run on version 2 instead (they could not:
//! replies name `charge_payment`; exit 9), which is why a rename needs a new version.

use std::process::ExitCode;

use skald::cli::Cli;
use skald_sagas::checkout::{CheckoutTiming, checkout_definition, checkout_definition_named};

fn main() -> ExitCode {
    let timing = CheckoutTiming::default();
    let definitions = checkout_definition(timing).and_then(|v1| {
        checkout_definition_named(timing, 2, ["reserve_inventory", "charge", "ship_order"])
            .map(|v2| (v1, v2))
    });
    match definitions {
        Ok((v1, v2)) => Cli::new().register(&v1).register(&v2).main(),
        Err(e) => {
            eprintln!("versioning: invalid definition: {e}");
            ExitCode::FAILURE
        }
    }
}
