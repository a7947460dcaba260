//! In-memory adapters: an in-process bus and a store. Nothing survives the process.

mod bus;
mod store;

pub use bus::MemoryBus;
pub use store::MemoryStore;
