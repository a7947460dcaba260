//! Payload schema versions and upcasters.
//!
//! Every stored payload names its schema version: a saga's data (`SagaState::data_version`,
//! declared by the definition's `data_version`), journal entries (`schema_version`),
//! commands (the `Skald-Schema-Version` header, declared per step), lifecycle events
//! (`skald.event/1`). When a payload's shape changes, its version goes up and an
//! upcaster brings old payloads to the new shape **on read**: a saga's data when its
//! actor loads it (the next commit stores the new shape), a journal's starting data when
//! it is replayed. `skald migrate-payloads` rewrites stored data ahead of time.
//!
//! Upcasters are registered per payload type as steps (`from` → `to`); the path from a
//! stored version to the current one is found by a breadth-first search over the
//! registered steps (the fewest steps), not a hard-coded table, so a v1 → v3 step can
//! short-cut v1 → v2 → v3. No path is a [`UpcastError::NoPath`] naming the type and
//! both versions: the saga is dead-lettered with that reason (re-drive it once the
//! upcaster is registered), never a crash.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;

use serde_json::Value;

/// One upcasting step: the payload at `from` to the payload at `to`.
pub type UpcastFn = Arc<dyn Fn(Value) -> Result<Value, String> + Send + Sync>;

/// Why a payload could not be brought to the version wanted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UpcastError {
    /// No chain of registered upcasters leads from the stored version to the wanted one.
    #[error(
        "no upcaster path for {payload_type} from schema version {from} to {to} \
         (registered steps: {registered})"
    )]
    NoPath {
        /// The payload type (`<saga_type>.data` for saga data).
        payload_type: String,
        /// The stored version.
        from: u32,
        /// The version wanted.
        to: u32,
        /// The steps registered for the type, e.g. `1→2, 2→3`, or `none`.
        registered: String,
    },
    /// An upcaster on the path refused the payload.
    #[error("upcasting {payload_type} from schema version {from} to {to} failed: {reason}")]
    Failed {
        /// The payload type.
        payload_type: String,
        /// The step's source version.
        from: u32,
        /// The step's target version.
        to: u32,
        /// What the upcaster said.
        reason: String,
    },
    /// The stored payload is newer than this build knows (a rollback after a migration).
    #[error(
        "{payload_type} is at schema version {from}, newer than this build's {to}: \
         run the release that wrote it"
    )]
    Newer {
        /// The payload type.
        payload_type: String,
        /// The stored version.
        from: u32,
        /// This build's version.
        to: u32,
    },
}

/// The upcasters a runtime (or the CLI) knows, per payload type.
#[derive(Clone, Default)]
pub struct Upcasters {
    steps: HashMap<String, Vec<(u32, u32, UpcastFn)>>,
}

impl fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut types: Vec<String> = self
            .steps
            .keys()
            .map(|t| format!("{t}: {}", self.describe(t)))
            .collect();
        types.sort();
        f.debug_struct("Upcasters").field("steps", &types).finish()
    }
}

/// The payload type of a saga type's data.
pub fn data_payload_type(saga_type: &str) -> String {
    format!("{saga_type}.data")
}

impl Upcasters {
    /// No upcasters.
    pub fn new() -> Upcasters {
        Upcasters::default()
    }

    /// Registers the step `from` → `to` for `payload_type`. A later registration of the
    /// same step replaces the earlier.
    pub fn register(
        &mut self,
        payload_type: impl Into<String>,
        from: u32,
        to: u32,
        f: impl Fn(Value) -> Result<Value, String> + Send + Sync + 'static,
    ) {
        let steps = self.steps.entry(payload_type.into()).or_default();
        steps.retain(|(a, b, _)| (*a, *b) != (from, to));
        steps.push((from, to, Arc::new(f)));
        steps.sort_by_key(|(a, b, _)| (*a, *b));
    }

    fn describe(&self, payload_type: &str) -> String {
        match self.steps.get(payload_type) {
            Some(steps) if !steps.is_empty() => steps
                .iter()
                .map(|(a, b, _)| format!("{a}→{b}"))
                .collect::<Vec<_>>()
                .join(", "),
            _ => "none".to_owned(),
        }
    }

    /// The versions a payload goes through from `from` to `to` (both included): the
    /// shortest chain of registered steps, found by breadth-first search.
    pub fn path(&self, payload_type: &str, from: u32, to: u32) -> Result<Vec<u32>, UpcastError> {
        if from == to {
            return Ok(vec![from]);
        }
        if from > to {
            return Err(UpcastError::Newer {
                payload_type: payload_type.to_owned(),
                from,
                to,
            });
        }
        let steps = self
            .steps
            .get(payload_type)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let mut came_from: HashMap<u32, u32> = HashMap::new();
        let mut queue = VecDeque::from([from]);
        while let Some(v) = queue.pop_front() {
            if v == to {
                let mut path = vec![to];
                let mut at = to;
                while at != from {
                    at = came_from[&at];
                    path.push(at);
                }
                path.reverse();
                return Ok(path);
            }
            for (a, b, _) in steps {
                if *a == v && *b != from && !came_from.contains_key(b) {
                    came_from.insert(*b, v);
                    queue.push_back(*b);
                }
            }
        }
        Err(UpcastError::NoPath {
            payload_type: payload_type.to_owned(),
            from,
            to,
            registered: self.describe(payload_type),
        })
    }

    /// Brings `value` of `payload_type` from version `from` to `to`.
    pub fn upcast(
        &self,
        payload_type: &str,
        value: Value,
        from: u32,
        to: u32,
    ) -> Result<Value, UpcastError> {
        let path = self.path(payload_type, from, to)?;
        let steps = self
            .steps
            .get(payload_type)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let mut value = value;
        for pair in path.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            // The path only holds registered steps.
            let Some((_, _, f)) = steps.iter().find(|(x, y, _)| (*x, *y) == (a, b)) else {
                continue;
            };
            value = f(value).map_err(|reason| UpcastError::Failed {
                payload_type: payload_type.to_owned(),
                from: a,
                to: b,
                reason,
            })?;
        }
        Ok(value)
    }
}

/// Brings a saga's data to its definition's data version (`definition.data_version()`)
/// through the upcasters of [`data_payload_type`]. Data already at that version is left
/// as is. On an error `state` is unchanged: no path ([`UpcastError::NoPath`]), a refusing
/// upcaster, or data newer than the definition's ([`UpcastError::Newer`]).
///
/// The one way stored saga data is brought up: an instance when it loads its saga, and
/// `skald migrate-payloads` ahead of time.
pub fn upcast_saga_data(
    upcasters: &Upcasters,
    definition: &crate::definition::Definition,
    state: &mut crate::machine::SagaState,
) -> Result<(), UpcastError> {
    let want = definition.data_version();
    if state.data_version == want {
        return Ok(());
    }
    let payload_type = data_payload_type(state.saga_type.as_str());
    state.data = upcasters.upcast(&payload_type, state.data.clone(), state.data_version, want)?;
    state.data_version = want;
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn chain() -> Upcasters {
        let mut u = Upcasters::new();
        u.register("order.data", 1, 2, |mut v| {
            v["currency"] = json!("EUR");
            Ok(v)
        });
        u.register("order.data", 2, 3, |mut v| {
            let cents = v["amount"].as_u64().ok_or("amount is not a number")?;
            v["amount"] = json!({ "cents": cents, "currency": v["currency"].take() });
            v.as_object_mut().map(|o| o.remove("currency"));
            Ok(v)
        });
        u
    }

    #[test]
    fn a_chain_is_applied_in_order() {
        let v = chain()
            .upcast("order.data", json!({ "amount": 5 }), 1, 3)
            .expect("upcast");
        assert_eq!(v, json!({ "amount": { "cents": 5, "currency": "EUR" } }));
        assert_eq!(chain().path("order.data", 1, 3), Ok(vec![1, 2, 3]));
        assert_eq!(chain().path("order.data", 2, 2), Ok(vec![2]));
    }

    #[test]
    fn the_search_takes_the_shortest_registered_path() {
        let mut u = chain();
        u.register("order.data", 1, 3, |v| Ok(json!({ "direct": v })));
        u.register("order.data", 3, 4, Ok);
        assert_eq!(u.path("order.data", 1, 4), Ok(vec![1, 3, 4]));
        assert_eq!(
            u.upcast("order.data", json!(1), 1, 3),
            Ok(json!({ "direct": 1 }))
        );
    }

    #[test]
    fn a_missing_step_names_the_type_and_both_versions() {
        let e = chain()
            .upcast("order.data", json!({}), 1, 5)
            .expect_err("no 3→5");
        assert_eq!(
            e.to_string(),
            "no upcaster path for order.data from schema version 1 to 5 (registered steps: 1→2, 2→3)"
        );
        let e = Upcasters::new().path("x.data", 1, 2).expect_err("none");
        assert!(e.to_string().contains("registered steps: none"), "{e}");
        let e = chain().path("order.data", 3, 2).expect_err("newer");
        assert!(
            matches!(e, UpcastError::Newer { from: 3, to: 2, .. }),
            "{e}"
        );
    }

    #[test]
    fn a_refusing_step_is_reported_with_its_versions() {
        let e = chain()
            .upcast("order.data", json!({ "amount": "five" }), 1, 3)
            .expect_err("refused");
        assert_eq!(
            e,
            UpcastError::Failed {
                payload_type: "order.data".into(),
                from: 2,
                to: 3,
                reason: "amount is not a number".into(),
            }
        );
    }

    #[test]
    fn cycles_do_not_loop() {
        let mut u = Upcasters::new();
        u.register("t", 1, 2, Ok);
        u.register("t", 2, 1, Ok);
        assert!(matches!(u.path("t", 1, 3), Err(UpcastError::NoPath { .. })));
    }

    #[test]
    fn saga_data_is_brought_to_the_definitions_data_version() {
        use crate::definition::{SagaDefinition, Step};
        use crate::ids::SagaId;
        use crate::machine::{SagaState, Timestamp};

        let definition = |data_version: u32| {
            SagaDefinition::<Value>::builder("order", 1)
                .data_version(data_version)
                .step(Step::new("ship").action("skald.cmd.ship.do", |_: &Value| json!({})))
                .build()
                .expect("valid")
        };
        let (v1, v3) = (definition(1), definition(3));
        let start = SagaState::new(
            SagaId::new(),
            v1.definition(),
            json!({ "amount": 5 }),
            Timestamp(1),
        );

        let mut state = start.clone();
        upcast_saga_data(&chain(), v3.definition(), &mut state).expect("upcast");
        assert_eq!(state.data_version, 3);
        assert_eq!(
            state.data,
            json!({ "amount": { "cents": 5, "currency": "EUR" } })
        );

        // Already current: untouched, whatever the upcasters.
        let mut same = start.clone();
        upcast_saga_data(&Upcasters::new(), v1.definition(), &mut same).expect("current");
        assert_eq!(same, start);

        // An error leaves the state as it was.
        let mut refused = start.clone();
        refused.data = json!({ "amount": "five" });
        let before = refused.clone();
        let e = upcast_saga_data(&chain(), v3.definition(), &mut refused).expect_err("refused");
        assert!(
            matches!(e, UpcastError::Failed { from: 2, to: 3, .. }),
            "{e}"
        );
        assert_eq!(refused, before);
        let e = upcast_saga_data(&chain(), v1.definition(), &mut state).expect_err("newer");
        assert!(
            matches!(e, UpcastError::Newer { from: 3, to: 1, .. }),
            "{e}"
        );
        assert_eq!(state.data_version, 3);
    }
}
