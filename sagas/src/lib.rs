//! # skald-sagas
//!
//! Business logic only: the checkout saga (reserve inventory, charge payment, ship the
//! order), its message types, and simulated inventory / payment / shipping services.
//! This crate names no database or broker: the services' records go through the
//! [`sim::Ledger`] trait.
//!
//! # Layout
//!
//! - [`checkout`]: the saga definition, its data and messages, and the consistency check
//!   (built on `skald-core` alone: a definition needs no runtime).
//! - [`sim`]: the simulated services and an in-memory ledger.
//! - [`scripted`]: participants scripted by order id, leaving a saga in every state (for
//!   demos and tests of the operator tools).

pub mod checkout;
pub mod scripted;
pub mod sim;
