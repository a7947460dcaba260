//! # skald-runtime
//!
//! The shell of skald, a saga orchestration runtime: sagas are declared in Rust as ordered
//! steps, each a command to a participant service with an optional compensation; every
//! saga instance runs as an actor that persists its state, moves forward on replies and,
//! on failure, compensates the completed steps in reverse order. What decides is in
//! `skald-core` (no I/O); this crate does the I/O around it.
//!
//! # Layout
//!
//! The pure core, from `skald-core` and re-exported here:
//!
//! - [`ids`]: typed names and ids (`SagaId`, `SagaType`, `StepName`, `CommandKind`).
//! - [`retry`]: the retry math (exponential backoff, full jitter), pure.
//! - [`definition`]: the typed builder and the validated, type-erased [`Definition`].
//! - [`machine`]: the pure state machine, `transition(&definition, &state, input, now)`.
//! - [`journal`]: the typed journal records (transition, ignored, snapshot).
//! - [`replay`]: the journal fed back through the machine: time travel, replay checks,
//!   and how retries are compacted.
//! - [`upcast`]: payload schema versions and the upcasters that bring old payloads up.
//!
//! The shell, in this crate:
//!
//! - [`ports`]: the `SagaStore`, `Bus` and `Clock` traits the adapters implement.
//! - [`wire`]: how commands and replies look on the bus (headers and bodies).
//! - [`auth`]: who may speak on the bus: reply tokens (HMAC) and operator signatures.
//! - [`committer`]: group commit: many instances' transitions in one store transaction.
//! - [`actors`]: the actix shell: `SagaInstance` (`actors/instance.rs`), the pure
//!   decision of each input's write (`actors/decide.rs`), the publisher
//!   (`actors/publisher.rs`), the `Registry` and the `WakeupSweeper`
//!   (`actors/wakeups.rs`).
//! - [`runtime`]: [`Runtime`], which wires the above together: the handle
//!   (`runtime/mod.rs`), [`RuntimeBuilder`] (`runtime/builder.rs`), [`RuntimeOptions`]
//!   (`runtime/options.rs`), the reply and operator-request intake
//!   (`runtime/intake.rs`), the outbox relay and dead-letter announcements
//!   (`runtime/outbox.rs`), and the background loops (`runtime/background.rs`).
//! - [`participant`]: a helper to write participant services in Rust.
//! - [`metrics`]: what the runtime measures (through the `metrics` facade).
//! - [`trace`]: W3C trace context and the ids of skald's spans.
//! - [`error`]: the runtime's error type and what each error tells the caller to do.
//!
//! [`Definition`]: definition::Definition
//! [`Runtime`]: runtime::Runtime
//! [`RuntimeBuilder`]: runtime::RuntimeBuilder
//! [`RuntimeOptions`]: runtime::RuntimeOptions

/// Declares a set of counters twice from one list: the struct the runtime updates in
/// place (`AtomicU64`s, crate-private) and the plain snapshot callers read
/// (`u64`s, from `snapshot()`).
macro_rules! counters {
    (
        $(#[$meta:meta])* $name:ident => $(#[$snap_meta:meta])* $snapshot:ident {
            $($(#[doc = $doc:literal])* $field:ident,)*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Default)]
        pub struct $name {
            $($(#[doc = $doc])* pub(crate) $field: std::sync::atomic::AtomicU64,)*
        }

        $(#[$snap_meta])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct $snapshot {
            $($(#[doc = $doc])* pub $field: u64,)*
        }

        impl $name {
            /// The counters now (each read on its own: a snapshot taken while the runtime
            /// works is not one instant across counters).
            pub fn snapshot(&self) -> $snapshot {
                $snapshot {
                    $($field: self.$field.load(std::sync::atomic::Ordering::Relaxed),)*
                }
            }
        }
    };
}
pub(crate) use counters;

// The pure core, re-exported where the runtime has always had it.
pub use skald_core::{definition, ids, journal, machine, replay, retry, testing, upcast};

pub mod actors;
pub mod auth;
pub mod committer;
pub mod error;
pub mod metrics;
pub mod participant;
pub mod partitions;
pub mod ports;
pub mod runtime;
pub mod trace;
pub mod wire;

pub(crate) use skald_core::{serde_millis, serde_millis_opt};
