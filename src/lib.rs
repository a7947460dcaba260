//! # skald
//!
//! A saga orchestration runtime for Rust services that talk over NATS. Declare a saga
//! as ordered steps, each a command to a participant service with an optional
//! compensation; skald runs every saga instance as an actor that persists its state,
//! retries failed or timed-out steps with jittered exponential backoff, compensates the
//! completed steps in reverse order on failure, and dead-letters what cannot be done for
//! an operator to re-drive.
//!
//! This crate is the facade: it re-exports the runtime, the adapters and the example
//! sagas.
//!
//! # Layout
//!
//! - [`definition`], [`machine`], [`retry`], [`ids`], [`journal`], [`replay`],
//!   [`upcast`]: declaring sagas, the pure state machine, the typed journal and replay
//!   (from `skald-core`, the crate with no I/O);
//! - [`prelude`]: the names a service that declares and runs sagas uses most;
//! - [`testing`]: test kits with virtual time (docs/testing.md): `SagaTest`, unit tests
//!   of a saga definition on the pure machine (no actors, store or bus), and
//!   `TestRuntime`, a real runtime on the in-memory store and bus with a manual clock
//!   and scripted participants, for integration tests of a service's sagas;
//! - [`Runtime`], [`RuntimeOptions`]: running them (actors, group commit, reply intake);
//! - [`ports`], [`wire`], [`auth`], [`participant`]: the store and bus traits, the wire
//!   format, reply tokens and operator signatures, and a helper for participant services
//!   written in Rust (from `skald-runtime`, the shell);
//! - [`adapters`]: in-memory bus and store, SQLite and PostgreSQL stores, the NATS
//!   JetStream bus (`skald-adapters`, one cargo feature each);
//! - `sagas` (feature `demo`, off by default): the checkout saga and its simulated
//!   services (`skald-sagas`), the worked example;
//! - `cli` (feature `cli`, on by default): the `skald` operator CLI as a library, for a
//!   binary with your own definitions registered; and `cli::NatsArgs`, the NATS
//!   authentication and TLS flags (`--creds`, `--nkey`, `--user`/`--password`,
//!   `--token`, `--tls-ca`/`--tls-cert`/`--tls-key`) every skald binary takes;
//! - [`metrics`]: the Prometheus `/metrics` endpoint; [`trace`]: W3C trace context and
//!   skald's span ids; [`telemetry`]: the subscriber (text or JSON logs, OTLP traces
//!   with the `otlp` feature) for binaries.
//!
//! # Examples
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use skald::adapters::{memory::MemoryBus, sqlite::SqliteStore};
//! use skald::prelude::*;
//! # #[derive(serde::Serialize, serde::Deserialize)] struct Order { id: String }
//! # let order_saga = SagaDefinition::<Order>::builder("order", 1)
//! #     .step(Step::new("charge").action("skald.cmd.payment.charge", |o: &Order| o.id.clone()))
//! #     .build()?;
//! let runtime = Runtime::builder()
//!     .store(SqliteStore::connect("sqlite://skald.db").await?)
//!     .bus(MemoryBus::new())
//!     .register(&order_saga)
//!     .start()
//!     .await?;
//! let handle = runtime.start_saga_keyed(&order_saga, "order-1", &Order { id: "order-1".into() }).await?;
//! let outcome = handle.outcome_within(Duration::from_secs(60)).await?;
//! println!("saga {} settled {:?}", handle.id(), outcome.status);
//! # Ok(()) }
//! ```

#[cfg(feature = "cli")]
pub mod cli;
pub mod metrics;
pub mod telemetry;
pub mod testing;

/// What a service that declares and runs sagas names most: `use skald::prelude::*;`.
///
/// ```
/// use skald::prelude::*;
/// # #[derive(serde::Serialize, serde::Deserialize)] struct Order { id: String }
/// let def = SagaDefinition::<Order>::builder("order", 1)
///     .step(Step::new("charge").action("skald.cmd.payment.charge", |o: &Order| o.id.clone()))
///     .build()
///     .expect("valid");
/// let mut t = SagaTest::start(&def, Order { id: "o-1".into() });
/// let c = t.expect_action("charge");
/// t.succeed(&c, serde_json::json!(null));
/// assert_eq!(t.status(), SagaStatus::Completed);
/// ```
pub mod prelude {
    #[cfg(feature = "memory")]
    pub use crate::testing::TestRuntime;
    pub use skald_runtime::definition::{SagaDefinition, Step};
    pub use skald_runtime::ids::SagaId;
    pub use skald_runtime::machine::SagaStatus;
    pub use skald_runtime::retry::RetryPolicy;
    pub use skald_runtime::runtime::{Runtime, RuntimeOptions, SagaHandle, SagaView};
    pub use skald_runtime::testing::SagaTest;

    pub use crate::RuntimeError;
}

pub use skald_adapters as adapters;
pub use skald_runtime::actors::{Applied, SagaOutcome};
pub use skald_runtime::error::{Disposition, RuntimeError};
pub use skald_runtime::runtime::{
    PreparedStart, Runtime, RuntimeBuilder, RuntimeOptions, SagaHandle, SagaView,
};
pub use skald_runtime::{
    auth, definition, ids, journal, machine, participant, ports, replay, retry, trace, upcast, wire,
};
#[cfg(feature = "demo")]
pub use skald_sagas as sagas;
