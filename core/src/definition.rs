//! Saga definitions: a named, versioned list of ordered steps, declared with a typed builder.
//!
//! The builder is typed over the saga data `D`; the built [`Definition`] is type-erased
//! (closures over `serde_json::Value`) so that one runtime can host many saga types and the
//! machine stays a plain function. [`SagaDefinition<D>`] is the typed handle users keep to
//! start sagas with a `D`.

use std::collections::HashSet;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::ids::{NameError, SagaType, StepName, check_subject};
use crate::retry::{PolicyError, RetryPolicy};

/// Default step timeout: how long to wait for a participant's reply before the attempt
/// counts as failed (retryable).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a definition was refused by [`SagaDefinitionBuilder::build`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DefinitionError {
    /// The saga type name is not a valid token.
    #[error("saga definition: {0}")]
    InvalidSagaType(NameError),
    /// The definition has no step at all.
    #[error("saga {saga:?} has no steps: add at least one with .step(..)")]
    NoSteps {
        /// The saga type.
        saga: String,
    },
    /// A step name is not a valid token.
    #[error("saga {saga:?}, step #{index}: {source}")]
    InvalidStepName {
        /// The saga type.
        saga: String,
        /// Position of the step (0-based).
        index: usize,
        /// What is wrong with the name.
        source: NameError,
    },
    /// Two steps share a name.
    #[error("saga {saga:?}: step name {step:?} is used twice")]
    DuplicateStep {
        /// The saga type.
        saga: String,
        /// The repeated name.
        step: String,
    },
    /// A step has no action command.
    #[error("saga {saga:?}, step {step:?}: no action (call .action(subject, build))")]
    MissingAction {
        /// The saga type.
        saga: String,
        /// The step.
        step: String,
    },
    /// A command subject is not a valid NATS publish subject.
    #[error("saga {saga:?}, step {step:?}: {source}")]
    InvalidSubject {
        /// The saga type.
        saga: String,
        /// The step.
        step: String,
        /// What is wrong with the subject.
        source: NameError,
    },
    /// A step's timeout is zero.
    #[error("saga {saga:?}, step {step:?}: timeout must be greater than zero")]
    ZeroTimeout {
        /// The saga type.
        saga: String,
        /// The step.
        step: String,
    },
    /// A retry policy is invalid.
    #[error("saga {saga:?}, step {step:?}, {which} retry policy: {source}")]
    InvalidRetry {
        /// The saga type.
        saga: String,
        /// The step.
        step: String,
        /// `action` or `compensation`.
        which: &'static str,
        /// What is wrong with the policy.
        source: PolicyError,
    },
}

/// A saga's data could not be read or written by a step's closure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{context}: {message}")]
pub struct DataError {
    /// What was being done ("decoding saga data", "decoding reply output", ...).
    pub context: &'static str,
    /// The serde error.
    pub message: String,
}

impl DataError {
    fn new(context: &'static str, err: impl fmt::Display) -> Self {
        DataError {
            context,
            message: err.to_string(),
        }
    }
}

type BuildFn = Arc<dyn Fn(&Value) -> Result<Value, DataError> + Send + Sync>;
/// The data decoded as the data type and encoded again; for JSON text, also the paths of
/// the input fields decoding ignored (written as [`ReadData::lost_fields`] writes them;
/// at most [`MAX_IGNORED`]).
type ReadDataFn = fn(DataInput<'_>) -> Result<(Value, Vec<String>), DataError>;

/// The most ignored input paths [`Definition::read_data_json`] keeps track of.
const MAX_IGNORED: usize = 256;

/// What [`Definition::read_data`] and [`Definition::read_data_json`] read.
#[derive(Clone, Copy)]
enum DataInput<'a> {
    Value(&'a Value),
    Json(&'a str),
}
type ApplyFn = Arc<dyn Fn(&Value, &Value) -> Result<Value, DataError> + Send + Sync>;

/// A command as declared: where it goes and how its payload is built from the data.
#[derive(Clone)]
pub struct CommandTemplate {
    subject: String,
    build: BuildFn,
}

impl CommandTemplate {
    /// The NATS subject the command is published on.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Builds the JSON payload from the saga data.
    pub fn payload(&self, data: &Value) -> Result<Value, DataError> {
        (self.build)(data)
    }
}

impl fmt::Debug for CommandTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandTemplate")
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

/// One validated step of a [`Definition`].
#[derive(Clone)]
pub struct StepDefinition {
    name: StepName,
    action: CommandTemplate,
    on_success: Option<ApplyFn>,
    compensation: Option<CommandTemplate>,
    retry: RetryPolicy,
    compensation_retry: RetryPolicy,
    timeout: Duration,
    schema_version: u32,
}

impl StepDefinition {
    /// The schema version of the step's command payloads (the `Skald-Schema-Version`
    /// header): participants may accept some versions only.
    pub fn schema_version(&self) -> u32 {
        self.schema_version
    }
    /// The step's name.
    pub fn name(&self) -> &StepName {
        &self.name
    }
    /// The forward command.
    pub fn action(&self) -> &CommandTemplate {
        &self.action
    }
    /// The compensation command, if the step can be undone.
    pub fn compensation(&self) -> Option<&CommandTemplate> {
        self.compensation.as_ref()
    }
    /// Retry policy of the action.
    pub fn retry(&self) -> &RetryPolicy {
        &self.retry
    }
    /// Retry policy of the compensation.
    pub fn compensation_retry(&self) -> &RetryPolicy {
        &self.compensation_retry
    }
    /// How long one attempt may wait for its reply.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Applies a success reply's output to the saga data; without an `on_success`
    /// handler the data is unchanged.
    pub fn apply_output(&self, data: &Value, output: &Value) -> Result<Option<Value>, DataError> {
        match &self.on_success {
            Some(apply) => apply(data, output).map(Some),
            None => Ok(None),
        }
    }
}

impl fmt::Debug for StepDefinition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepDefinition")
            .field("name", &self.name)
            .field("action", &self.action)
            .field("compensation", &self.compensation)
            .field("retry", &self.retry)
            .field("compensation_retry", &self.compensation_retry)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// A validated, type-erased saga definition: what the machine runs.
pub struct Definition {
    saga_type: SagaType,
    version: u32,
    data_version: u32,
    steps: Vec<StepDefinition>,
    /// Decodes JSON as the saga data type `D` and encodes it again (set by the typed
    /// builder): what a start from untyped JSON checks its data with.
    read_data: ReadDataFn,
}

impl fmt::Debug for Definition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Definition")
            .field("saga_type", &self.saga_type)
            .field("version", &self.version)
            .field("data_version", &self.data_version)
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

/// `data` decoded as `D` and encoded again, with the input paths decoding ignored (JSON
/// text only).
fn read_data<D: Serialize + DeserializeOwned>(
    data: DataInput<'_>,
) -> Result<(Value, Vec<String>), DataError> {
    let mut ignored = Vec::new();
    let typed: D = match data {
        DataInput::Value(v) => {
            D::deserialize(v).map_err(|e| DataError::new("decoding saga data", e))?
        }
        DataInput::Json(text) => {
            let mut de = serde_json::Deserializer::from_str(text);
            serde_ignored::deserialize(&mut de, |path| {
                if ignored.len() < MAX_IGNORED {
                    ignored.push(ignored_path(&path));
                }
            })
            .and_then(|typed| de.end().map(|()| typed))
            .map_err(|e| {
                // serde's reason without the position in `text` (which is not the whole
                // message the client sent): the same reason as from a `Value`.
                let position = format!(" at line {} column {}", e.line(), e.column());
                let reason = e.to_string();
                let reason = reason.strip_suffix(&position).unwrap_or(&reason);
                DataError::new("decoding saga data", reason)
            })?
        }
    };
    let value =
        serde_json::to_value(&typed).map_err(|e| DataError::new("encoding saga data", e))?;
    Ok((value, ignored))
}

/// A path decoding ignored, written as [`ReadData::lost_fields`] writes paths
/// (`items[0].colour`).
fn ignored_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", ignored_path(parent)),
        Path::Map { parent, key } => {
            let parent = ignored_path(parent);
            if parent.is_empty() {
                key.clone()
            } else {
                format!("{parent}.{key}")
            }
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => ignored_path(parent),
    }
}

/// Saga data read from JSON text ([`Definition::read_data_json`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ReadData {
    /// The data as a saga started with it stores it (decoded as the data type and
    /// encoded again).
    pub data: Value,
    /// Fields of the input that decoding ignored and [`ReadData::data`] does not have,
    /// but those whose value is empty (`null`, `[]`, `{}`): fields the data type does
    /// not know (a client writing for a newer version of it, during a rolling deploy).
    /// Paths from the top of the data (`gift_wrap`, `items[0].colour`), each at most
    /// [`MAX_LOST_FIELD_BYTES`] bytes; at most [`MAX_LOST_FIELDS`] of them.
    pub lost_fields: Vec<String>,
}

/// The most fields [`ReadData::lost_fields`] names.
pub const MAX_LOST_FIELDS: usize = 8;
/// The most bytes of one path in [`ReadData::lost_fields`].
pub const MAX_LOST_FIELD_BYTES: usize = 128;

/// The paths of the object fields of the JSON text `input` (not empty: `null`, `[]`,
/// `{}`) that `kept` does not have at the same place: compared object by object and array element by array
/// element, as far as both have the same shape. Read as a stream: nothing of `input` is
/// held but the path being walked.
fn lost_fields(input: &str, kept: &Value, ignored: &[String]) -> Vec<String> {
    let mut walk = Walk {
        path: String::new(),
        lost: Vec::new(),
        ignored,
    };
    let mut de = serde_json::Deserializer::from_str(input);
    // `input` was decoded already: an error here (none is expected) only ends the walk.
    let _ = serde::de::DeserializeSeed::deserialize(
        Node {
            kept: Some(kept),
            walk: &mut walk,
        },
        &mut de,
    );
    walk.lost
}

struct Walk<'i> {
    /// The path of the node being read (`items[0].colour`).
    path: String,
    lost: Vec<String>,
    /// The paths decoding ignored: only those are lost. A field the encoding leaves
    /// out but decoding read (`skip_serializing_if`, an `alias`) is not.
    ignored: &'i [String],
}

impl Walk<'_> {
    fn lose(&mut self, key: &str) {
        if self.lost.len() >= MAX_LOST_FIELDS {
            return;
        }
        let mut path = self.path.clone();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key);
        if !self.ignored.contains(&path) {
            return;
        }
        self.lost
            .push(crate::text::cap(&path, MAX_LOST_FIELD_BYTES).to_owned());
    }
}

/// One value of the input, compared with `kept` (`None`: nothing to compare with).
/// Yields whether it was empty: `null`, `[]` or `{}`.
struct Node<'a, 'w, 'i> {
    kept: Option<&'a Value>,
    walk: &'w mut Walk<'i>,
}

impl<'de> serde::de::DeserializeSeed<'de> for Node<'_, '_, '_> {
    type Value = bool;

    fn deserialize<De: serde::Deserializer<'de>>(self, de: De) -> Result<bool, De::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Node<'_, '_, '_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> Result<bool, E> {
        Ok(true)
    }
    fn visit_none<E>(self) -> Result<bool, E> {
        Ok(true)
    }
    fn visit_bool<E>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_i64<E>(self, _: i64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_u64<E>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_f64<E>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_str<E>(self, _: &str) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        let kept = self.kept.and_then(Value::as_array);
        let mut i = 0usize;
        loop {
            let child = kept.and_then(|k| k.get(i));
            let len = self.walk.path.len();
            if child.is_some() {
                use fmt::Write as _;
                let _ = write!(self.walk.path, "[{i}]");
            }
            let read = seq.next_element_seed(Node {
                kept: child,
                walk: &mut *self.walk,
            })?;
            self.walk.path.truncate(len);
            if read.is_none() {
                return Ok(i == 0);
            }
            i += 1;
        }
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        let kept = self.kept.and_then(Value::as_object);
        let mut empty = true;
        while let Some(key) = map.next_key::<String>()? {
            empty = false;
            // Not an object where the input has one: not comparable.
            let Some(kept) = kept else {
                map.next_value::<serde::de::IgnoredAny>()?;
                continue;
            };
            match kept.get(&key) {
                Some(child) => {
                    let len = self.walk.path.len();
                    if len > 0 {
                        self.walk.path.push('.');
                    }
                    self.walk.path.push_str(&key);
                    map.next_value_seed(Node {
                        kept: Some(child),
                        walk: &mut *self.walk,
                    })?;
                    self.walk.path.truncate(len);
                }
                None => {
                    let empty = map.next_value_seed(Node {
                        kept: None,
                        walk: &mut *self.walk,
                    })?;
                    if !empty {
                        self.walk.lose(&key);
                    }
                }
            }
        }
        Ok(empty)
    }
}

impl Definition {
    /// The schema version of the saga data `D` (see [`SagaDefinitionBuilder::data_version`]).
    pub fn data_version(&self) -> u32 {
        self.data_version
    }
    /// The saga type.
    pub fn saga_type(&self) -> &SagaType {
        &self.saga_type
    }
    /// The definition version.
    pub fn version(&self) -> u32 {
        self.version
    }
    /// The steps, in order (never empty).
    pub fn steps(&self) -> &[StepDefinition] {
        &self.steps
    }
    /// The step at `index`.
    pub fn step(&self, index: usize) -> Option<&StepDefinition> {
        self.steps.get(index)
    }
    /// Position of the step named `name`.
    pub fn step_index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name.as_str() == name)
    }

    /// Reads `data` as this definition's saga data type (the `D` it was built over,
    /// at [`Definition::data_version`]) and writes it back: the data a saga started
    /// with it stores, exactly as a typed start with the decoded value would store it.
    /// An error, with serde's reason, when `data` is not one: a start from untyped JSON
    /// (a start request over the bus) is refused with it before anything is stored,
    /// rather than stored and dead-lettered when its first command is built.
    ///
    /// # Examples
    ///
    /// ```
    /// # use serde::{Deserialize, Serialize};
    /// # use skald_core::definition::{SagaDefinition, Step};
    /// #[derive(Serialize, Deserialize)]
    /// struct Order { id: String, #[serde(default)] note: Option<String> }
    /// let def = SagaDefinition::<Order>::builder("order", 1)
    ///     .step(Step::new("ship").action("skald.cmd.shipping.ship", |o: &Order| o.id.clone()))
    ///     .build()
    ///     .expect("valid");
    /// let read = def.definition().read_data(&serde_json::json!({"id": "o-1"})).expect("an Order");
    /// assert_eq!(read, serde_json::json!({"id": "o-1", "note": null}));
    /// let err = def.definition().read_data(&serde_json::json!({"id": 7})).expect_err("not an Order");
    /// assert!(err.to_string().starts_with("decoding saga data: invalid type"), "{err}");
    /// ```
    pub fn read_data(&self, data: &Value) -> Result<Value, DataError> {
        (self.read_data)(DataInput::Value(data)).map(|(data, _)| data)
    }

    /// [`Definition::read_data`] of JSON text, decoded straight from the text (no
    /// `Value` of the input is built: memory stays in proportion to the text), and the
    /// fields of the input the data type does not know ([`ReadData::lost_fields`]): a
    /// start written for a newer version of the data type, landing on an older build,
    /// would otherwise lose them without a word. Lost means what decoding ignored (the
    /// deserializer itself reports it): a field the data type reads under another name
    /// (a serde `alias`) or reads and skips writing (`skip_serializing_if`) is not lost.
    /// A field whose value is empty (`null`, `[]`, `{}`) is never counted lost either
    /// (it reads as absent).
    ///
    /// # Examples
    ///
    /// ```
    /// # use serde::{Deserialize, Serialize};
    /// # use skald_core::definition::{SagaDefinition, Step};
    /// #[derive(Serialize, Deserialize)]
    /// struct Order { id: String, #[serde(default)] note: Option<String> }
    /// let def = SagaDefinition::<Order>::builder("order", 1)
    ///     .step(Step::new("ship").action("skald.cmd.shipping.ship", |o: &Order| o.id.clone()))
    ///     .build()
    ///     .expect("valid");
    /// let read = def.definition().read_data_json(r#"{"id": "o-1", "gift": true, "x": null}"#)
    ///     .expect("an Order");
    /// assert_eq!(read.data, serde_json::json!({"id": "o-1", "note": null}));
    /// assert_eq!(read.lost_fields, ["gift"]);
    /// ```
    pub fn read_data_json(&self, json: &str) -> Result<ReadData, DataError> {
        let (data, ignored) = (self.read_data)(DataInput::Json(json))?;
        let lost_fields = if ignored.is_empty() {
            Vec::new()
        } else {
            lost_fields(json, &data, &ignored)
        };
        Ok(ReadData { data, lost_fields })
    }
}

/// The typed handle on a [`Definition`]: start sagas of this type with a `D`.
pub struct SagaDefinition<D> {
    inner: Arc<Definition>,
    _data: PhantomData<fn(D) -> D>,
}

impl<D> Clone for SagaDefinition<D> {
    fn clone(&self) -> Self {
        SagaDefinition {
            inner: Arc::clone(&self.inner),
            _data: PhantomData,
        }
    }
}

impl<D> fmt::Debug for SagaDefinition<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

impl<D> SagaDefinition<D>
where
    D: Serialize + DeserializeOwned + Send + 'static,
{
    /// Starts declaring saga type `saga_type`, version `version`.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use serde::{Deserialize, Serialize};
    /// use skald_core::definition::{SagaDefinition, Step};
    /// use skald_core::retry::RetryPolicy;
    ///
    /// #[derive(Serialize, Deserialize)]
    /// struct Order { id: String, amount: u64, payment_id: Option<String> }
    ///
    /// #[derive(Serialize, Deserialize)]
    /// struct Charged { payment_id: String }
    ///
    /// let definition = SagaDefinition::<Order>::builder("order", 1)
    ///     .step(
    ///         Step::new("charge_payment")
    ///             .action("skald.cmd.payment.charge", |o: &Order| {
    ///                 serde_json::json!({ "order": o.id, "amount": o.amount })
    ///             })
    ///             .on_success(|o: &mut Order, reply: Charged| o.payment_id = Some(reply.payment_id))
    ///             .compensate("skald.cmd.payment.refund", |o: &Order| {
    ///                 serde_json::json!({ "payment_id": o.payment_id })
    ///             })
    ///             .retry(RetryPolicy { max_attempts: 3, ..RetryPolicy::default() })
    ///             .timeout(Duration::from_secs(5)),
    ///     )
    ///     .build()
    ///     .expect("a valid definition");
    /// assert_eq!(definition.definition().steps().len(), 1);
    /// ```
    pub fn builder(saga_type: impl Into<String>, version: u32) -> SagaDefinitionBuilder<D> {
        SagaDefinitionBuilder {
            saga_type: saga_type.into(),
            version,
            data_version: 1,
            steps: Vec::new(),
        }
    }

    /// Serializes saga data for this definition.
    pub fn encode(&self, data: &D) -> Result<Value, DataError> {
        serde_json::to_value(data).map_err(|e| DataError::new("encoding saga data", e))
    }

    /// Reads saga data of this definition back from its stored form.
    pub fn decode(&self, data: &Value) -> Result<D, DataError> {
        D::deserialize(data).map_err(|e| DataError::new("decoding saga data", e))
    }
}

impl<D> SagaDefinition<D> {
    /// The type-erased definition, as the machine and the runtime see it.
    pub fn definition(&self) -> &Arc<Definition> {
        &self.inner
    }
}

/// Builds a [`SagaDefinition`]; see [`SagaDefinition::builder`].
pub struct SagaDefinitionBuilder<D> {
    saga_type: String,
    version: u32,
    data_version: u32,
    steps: Vec<Step<D>>,
}

impl<D> fmt::Debug for SagaDefinitionBuilder<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SagaDefinitionBuilder")
            .field("saga_type", &self.saga_type)
            .field("version", &self.version)
            .field("steps", &self.steps.len())
            .finish()
    }
}

impl<D> SagaDefinitionBuilder<D>
where
    D: Serialize + DeserializeOwned + Send + 'static,
{
    /// Appends a step; steps run in the order they are added.
    ///
    /// # Examples
    ///
    /// ```
    /// # use serde::{Deserialize, Serialize};
    /// # use skald_core::definition::{SagaDefinition, Step};
    /// # #[derive(Serialize, Deserialize)] struct Order { id: String }
    /// let builder = SagaDefinition::<Order>::builder("order", 1)
    ///     .step(Step::new("reserve").action("skald.cmd.inventory.reserve", |o: &Order| o.id.clone()))
    ///     .step(Step::new("ship").action("skald.cmd.shipping.ship", |o: &Order| o.id.clone()));
    /// assert!(builder.build().is_ok());
    /// ```
    pub fn step(mut self, step: Step<D>) -> Self {
        self.steps.push(step);
        self
    }

    /// The schema version of the saga data `D` (default 1). Raise it when `D`'s shape
    /// changes, and register an upcaster for `<saga_type>.data` from the old version
    /// (`RuntimeBuilder::upcaster`): a saga stored with older data is brought up when
    /// its actor loads it. Unlike the definition version, this does not split sagas:
    /// every saga of the definition runs the new code on upcast data.
    ///
    /// # Examples
    ///
    /// ```
    /// # use serde::{Deserialize, Serialize};
    /// # use skald_core::definition::{SagaDefinition, Step};
    /// # #[derive(Serialize, Deserialize)] struct Order { id: String }
    /// let def = SagaDefinition::<Order>::builder("order", 1)
    ///     .data_version(2)
    ///     .step(Step::new("ship").action("skald.cmd.shipping.ship", |o: &Order| o.id.clone()))
    ///     .build()
    ///     .expect("valid");
    /// assert_eq!(def.definition().data_version(), 2);
    /// ```
    pub fn data_version(mut self, version: u32) -> Self {
        self.data_version = version;
        self
    }

    /// Validates and builds the definition.
    ///
    /// Refused, with the step and the reason: no steps, an invalid or duplicate step
    /// name, a missing action, an invalid subject, a zero timeout, an invalid retry
    /// policy (zero attempts, max delay below initial delay, ...).
    ///
    /// # Examples
    ///
    /// ```
    /// # use serde::{Deserialize, Serialize};
    /// # use skald_core::definition::{DefinitionError, SagaDefinition, Step};
    /// # #[derive(Serialize, Deserialize)] struct Order { id: String }
    /// let err = SagaDefinition::<Order>::builder("order", 1).build().unwrap_err();
    /// assert!(matches!(err, DefinitionError::NoSteps { .. }));
    /// ```
    pub fn build(self) -> Result<SagaDefinition<D>, DefinitionError> {
        let saga_type =
            SagaType::new(self.saga_type.clone()).map_err(DefinitionError::InvalidSagaType)?;
        let saga = self.saga_type;
        if self.steps.is_empty() {
            return Err(DefinitionError::NoSteps { saga });
        }
        let mut seen = HashSet::new();
        let mut steps = Vec::with_capacity(self.steps.len());
        for (index, step) in self.steps.into_iter().enumerate() {
            let name = StepName::new(step.name.clone()).map_err(|source| {
                DefinitionError::InvalidStepName {
                    saga: saga.clone(),
                    index,
                    source,
                }
            })?;
            if !seen.insert(name.clone()) {
                return Err(DefinitionError::DuplicateStep {
                    saga,
                    step: step.name,
                });
            }
            let step_err = |n: &str| (saga.clone(), n.to_owned());
            let Some(action) = step.action else {
                let (saga, step) = step_err(&step.name);
                return Err(DefinitionError::MissingAction { saga, step });
            };
            for template in std::iter::once(&action).chain(step.compensation.as_ref()) {
                check_subject(&template.subject).map_err(|source| {
                    let (saga, step) = step_err(&step.name);
                    DefinitionError::InvalidSubject { saga, step, source }
                })?;
            }
            if step.timeout.is_zero() {
                let (saga, step) = step_err(&step.name);
                return Err(DefinitionError::ZeroTimeout { saga, step });
            }
            for (which, policy) in [
                ("action", &step.retry),
                ("compensation", &step.compensation_retry),
            ] {
                policy.validate().map_err(|source| {
                    let (saga, step) = step_err(&step.name);
                    DefinitionError::InvalidRetry {
                        saga,
                        step,
                        which,
                        source,
                    }
                })?;
            }
            steps.push(StepDefinition {
                name,
                action,
                on_success: step.on_success,
                compensation: step.compensation,
                retry: step.retry,
                compensation_retry: step.compensation_retry,
                timeout: step.timeout,
                schema_version: step.schema_version,
            });
        }
        Ok(SagaDefinition {
            inner: Arc::new(Definition {
                saga_type,
                version: self.version,
                data_version: self.data_version,
                steps,
                read_data: read_data::<D>,
            }),
            _data: PhantomData,
        })
    }
}

/// One step being declared: its action, how a success updates the data, its optional
/// compensation, retry policies and timeout.
pub struct Step<D> {
    name: String,
    action: Option<CommandTemplate>,
    on_success: Option<ApplyFn>,
    compensation: Option<CommandTemplate>,
    retry: RetryPolicy,
    compensation_retry: RetryPolicy,
    timeout: Duration,
    schema_version: u32,
    _data: PhantomData<fn(D) -> D>,
}

impl<D> fmt::Debug for Step<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Step")
            .field("name", &self.name)
            .field("action", &self.action)
            .field("compensation", &self.compensation)
            .finish_non_exhaustive()
    }
}

fn template<D, P, F>(subject: impl Into<String>, build: F) -> CommandTemplate
where
    D: DeserializeOwned + 'static,
    P: Serialize,
    F: Fn(&D) -> P + Send + Sync + 'static,
{
    CommandTemplate {
        subject: subject.into(),
        build: Arc::new(move |data: &Value| {
            let data = D::deserialize(data).map_err(|e| DataError::new("decoding saga data", e))?;
            serde_json::to_value(build(&data))
                .map_err(|e| DataError::new("encoding command payload", e))
        }),
    }
}

impl<D> Step<D>
where
    D: Serialize + DeserializeOwned + Send + 'static,
{
    /// A step named `name` (`a-z`, `0-9`, `_`, `-`), with default policies
    /// ([`RetryPolicy::default`] for both, [`DEFAULT_TIMEOUT`]).
    pub fn new(name: impl Into<String>) -> Self {
        Step {
            name: name.into(),
            action: None,
            on_success: None,
            compensation: None,
            retry: RetryPolicy::default(),
            compensation_retry: RetryPolicy::default(),
            schema_version: 1,
            timeout: DEFAULT_TIMEOUT,
            _data: PhantomData,
        }
    }

    /// The forward command: published on `subject` with a payload built from the data.
    ///
    /// # Examples
    ///
    /// ```
    /// # use serde::{Deserialize, Serialize};
    /// # use skald_core::definition::Step;
    /// # #[derive(Serialize, Deserialize)] struct Order { id: String }
    /// #[derive(Serialize)]
    /// struct Ship<'a> { order_id: &'a str }
    /// let step = Step::<Order>::new("ship")
    ///     .action("skald.cmd.shipping.ship", |o: &Order| serde_json::json!(Ship { order_id: &o.id }));
    /// ```
    pub fn action<P, F>(mut self, subject: impl Into<String>, build: F) -> Self
    where
        P: Serialize,
        F: Fn(&D) -> P + Send + Sync + 'static,
    {
        self.action = Some(template(subject, build));
        self
    }

    /// How the success reply's output (decoded as `O`) updates the data, so that later
    /// steps and compensations can use it (e.g. the payment id to refund).
    ///
    /// A success whose output does not decode as `O` did take effect at the participant,
    /// so the saga is dead-lettered (`undecodable_output`, with the serde error) rather
    /// than moved on or compensated around it; a later success of the step that decodes,
    /// or a re-drive once the participant or the definition is fixed, resumes it.
    ///
    /// # Examples
    ///
    /// ```
    /// # use serde::{Deserialize, Serialize};
    /// # use skald_core::definition::Step;
    /// # #[derive(Serialize, Deserialize)] struct Order { payment_id: Option<String> }
    /// #[derive(Deserialize)]
    /// struct Charged { payment_id: String }
    /// let step = Step::<Order>::new("charge")
    ///     .action("skald.cmd.payment.charge", |_o: &Order| ())
    ///     .on_success(|o: &mut Order, c: Charged| o.payment_id = Some(c.payment_id));
    /// ```
    pub fn on_success<O, F>(mut self, apply: F) -> Self
    where
        O: DeserializeOwned,
        F: Fn(&mut D, O) + Send + Sync + 'static,
    {
        self.on_success = Some(Arc::new(move |data: &Value, output: &Value| {
            let mut data =
                D::deserialize(data).map_err(|e| DataError::new("decoding saga data", e))?;
            let output =
                O::deserialize(output).map_err(|e| DataError::new("decoding reply output", e))?;
            apply(&mut data, output);
            serde_json::to_value(&data).map_err(|e| DataError::new("encoding saga data", e))
        }));
        self
    }

    /// The compensation: published on `subject` when a later step fails, to undo this one.
    ///
    /// It also undoes this step when its outcome is unknown (every attempt timed out, or a
    /// cancel arrived while it was in flight): `build` then sees saga data that the
    /// action's reply never updated, so what only that reply teaches (a payment id) is
    /// still absent. Keep such fields `Option`s and never unwrap them here; the
    /// participant undoes by the action's key (`Skald-Action-Key`), which the command
    /// carries either way.
    ///
    /// # Examples
    ///
    /// ```
    /// # use serde::{Deserialize, Serialize};
    /// # use skald_core::definition::Step;
    /// # #[derive(Serialize, Deserialize)] struct Order { reservation: Option<String> }
    /// let step = Step::<Order>::new("reserve")
    ///     .action("skald.cmd.inventory.reserve", |_o: &Order| ())
    ///     .compensate("skald.cmd.inventory.release", |o: &Order| o.reservation.clone());
    /// ```
    pub fn compensate<P, F>(mut self, subject: impl Into<String>, build: F) -> Self
    where
        P: Serialize,
        F: Fn(&D) -> P + Send + Sync + 'static,
    {
        self.compensation = Some(template(subject, build));
        self
    }

    /// Retry policy of the action (default [`RetryPolicy::default`]).
    ///
    /// # Examples
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use serde::{Deserialize, Serialize};
    /// # use skald_core::{definition::Step, retry::RetryPolicy};
    /// # #[derive(Serialize, Deserialize)] struct Order;
    /// let step = Step::<Order>::new("charge").retry(RetryPolicy {
    ///     max_attempts: 8,
    ///     initial_delay: Duration::from_millis(50),
    ///     multiplier: 3.0,
    ///     max_delay: Duration::from_secs(30),
    ///     jitter: 1.0,
    /// });
    /// ```
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Retry policy of the compensation (default [`RetryPolicy::default`]). A
    /// compensation that exhausts it dead-letters the saga for an operator.
    ///
    /// # Examples
    ///
    /// ```
    /// # use serde::{Deserialize, Serialize};
    /// # use skald_core::{definition::Step, retry::RetryPolicy};
    /// # #[derive(Serialize, Deserialize)] struct Order;
    /// let step = Step::<Order>::new("charge")
    ///     .compensation_retry(RetryPolicy { max_attempts: 20, ..RetryPolicy::default() });
    /// ```
    pub fn compensation_retry(mut self, policy: RetryPolicy) -> Self {
        self.compensation_retry = policy;
        self
    }

    /// How long one attempt waits for a reply before it counts as a retryable failure
    /// (default [`DEFAULT_TIMEOUT`]). Applies to the compensation too.
    ///
    /// # Examples
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use serde::{Deserialize, Serialize};
    /// # use skald_core::definition::Step;
    /// # #[derive(Serialize, Deserialize)] struct Order;
    /// let step = Step::<Order>::new("ship").timeout(Duration::from_secs(30));
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The schema version of this step's command payloads (default 1), sent in the
    /// `Skald-Schema-Version` header so a participant can refuse a version it does not
    /// read (docs/protocol.md). Raise it when the payload's shape changes.
    ///
    /// # Examples
    ///
    /// ```
    /// # use serde::{Deserialize, Serialize};
    /// # use skald_core::definition::Step;
    /// # #[derive(Serialize, Deserialize)] struct Order;
    /// let step = Step::<Order>::new("charge").schema_version(2);
    /// ```
    pub fn schema_version(mut self, version: u32) -> Self {
        self.schema_version = version;
        self
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Serialize, Deserialize)]
    struct Data {
        n: u32,
    }

    fn step(name: &str) -> Step<Data> {
        Step::new(name).action("skald.cmd.svc.do", |d: &Data| d.n)
    }

    fn build(steps: Vec<Step<Data>>) -> Result<SagaDefinition<Data>, DefinitionError> {
        steps
            .into_iter()
            .fold(SagaDefinition::<Data>::builder("test", 1), |b, s| b.step(s))
            .build()
    }

    #[test]
    fn no_steps() {
        let err = build(vec![]).expect_err("refused");
        assert_eq!(
            err,
            DefinitionError::NoSteps {
                saga: "test".into()
            }
        );
        assert!(err.to_string().contains("no steps"));
    }

    #[test]
    fn duplicate_step_names() {
        let err = build(vec![step("a"), step("b"), step("a")]).expect_err("refused");
        assert_eq!(
            err,
            DefinitionError::DuplicateStep {
                saga: "test".into(),
                step: "a".into()
            }
        );
    }

    #[test]
    fn zero_attempts_names_step_and_policy() {
        let s = step("pay").compensation_retry(RetryPolicy {
            max_attempts: 0,
            ..RetryPolicy::default()
        });
        let err = build(vec![s]).expect_err("refused");
        assert_eq!(
            err,
            DefinitionError::InvalidRetry {
                saga: "test".into(),
                step: "pay".into(),
                which: "compensation",
                source: PolicyError::ZeroAttempts
            }
        );
        assert!(err.to_string().contains("\"pay\""), "{err}");
    }

    #[test]
    fn zero_timeout() {
        let err = build(vec![step("a").timeout(Duration::ZERO)]).expect_err("refused");
        assert!(matches!(err, DefinitionError::ZeroTimeout { ref step, .. } if step == "a"));
    }

    #[test]
    fn max_delay_below_initial() {
        let s = step("a").retry(RetryPolicy {
            initial_delay: Duration::from_secs(2),
            max_delay: Duration::from_secs(1),
            ..RetryPolicy::default()
        });
        let err = build(vec![s]).expect_err("refused");
        assert!(matches!(
            err,
            DefinitionError::InvalidRetry {
                which: "action",
                source: PolicyError::MaxBelowInitial { .. },
                ..
            }
        ));
    }

    #[test]
    fn missing_action_and_bad_names() {
        let err = build(vec![Step::new("a")]).expect_err("refused");
        assert!(matches!(err, DefinitionError::MissingAction { .. }));
        let err = build(vec![step("Bad Name")]).expect_err("refused");
        assert!(matches!(
            err,
            DefinitionError::InvalidStepName { index: 0, .. }
        ));
        let err =
            build(vec![step("a").compensate("skald.cmd.*", |d: &Data| d.n)]).expect_err("refused");
        assert!(matches!(err, DefinitionError::InvalidSubject { .. }));
        let err = SagaDefinition::<Data>::builder("Check Out", 1)
            .step(step("a"))
            .build()
            .expect_err("refused");
        assert!(matches!(err, DefinitionError::InvalidSagaType(_)));
    }

    #[test]
    fn data_is_read_as_the_definitions_type() {
        let def = build(vec![step("a")]).expect("valid");
        let erased = def.definition();
        assert_eq!(
            erased.read_data(&serde_json::json!({"n": 3, "extra": true})),
            Ok(serde_json::json!({"n": 3}))
        );
        let err = erased
            .read_data(&serde_json::json!({"n": -1}))
            .expect_err("not a u32");
        assert_eq!(err.context, "decoding saga data");
        assert!(
            erased.read_data(&serde_json::json!("n")).is_err(),
            "a string is no Data"
        );
    }

    #[test]
    fn data_read_from_text_names_the_fields_it_lost() {
        #[derive(Serialize, Deserialize)]
        struct Item {
            sku: String,
        }
        #[derive(Serialize, Deserialize)]
        struct Order {
            n: u32,
            items: Vec<Item>,
            note: Option<String>,
            extra: Value,
        }
        let def = SagaDefinition::<Order>::builder("order", 1)
            .step(Step::new("a").action("skald.cmd.svc.a", |o: &Order| o.n))
            .build()
            .expect("valid");
        let erased = def.definition();
        let read = erased
            .read_data_json(
                r#"{"n": 1, "items": [{"sku": "a"}, {"sku": "b", "colour": "red"}],
                    "note": null, "gift": {"wrap": true}, "nothing": null, "none": [],
                    "nobody": {},
                    "extra": {"anything": [1, {"goes": 2}]}}"#,
            )
            .expect("an Order");
        assert_eq!(read.data["n"], 1);
        assert_eq!(read.lost_fields, ["items[1].colour", "gift"]);
        let read = erased
            .read_data_json(r#"{"n": 1, "items": [], "note": "x", "extra": null}"#)
            .expect("an Order");
        assert!(read.lost_fields.is_empty(), "{:?}", read.lost_fields);
        // The same reason as from a Value: no position in the text.
        let err = erased
            .read_data_json(r#"{"n": -1, "items": [], "note": null, "extra": 1}"#)
            .expect_err("not a u32");
        assert_eq!(
            Err(err),
            erased.read_data(&serde_json::json!({"n": -1, "items": [], "note": null, "extra": 1}))
        );
        let many: String = (0..20).map(|i| format!(r#","f{i}":{i}"#)).collect();
        let read = erased
            .read_data_json(&format!(
                r#"{{"n":1,"items":[],"note":null,"extra":1{many}}}"#
            ))
            .expect("an Order");
        assert_eq!(read.lost_fields.len(), MAX_LOST_FIELDS);
    }

    #[test]
    fn fields_read_but_not_written_back_are_not_lost() {
        // What decoding read is not lost, though the encoding leaves it out or writes it
        // under another name: only what decoding ignored is.
        #[derive(Serialize, Deserialize)]
        struct Order {
            n: u32,
            #[serde(default, skip_serializing_if = "String::is_empty")]
            note: String,
            #[serde(default, skip_serializing_if = "std::ops::Not::not")]
            urgent: bool,
            #[serde(default, alias = "customer_id")]
            customer: String,
        }
        let def = SagaDefinition::<Order>::builder("order", 1)
            .step(Step::new("a").action("skald.cmd.svc.a", |o: &Order| o.n))
            .build()
            .expect("valid");
        let read = def
            .definition()
            .read_data_json(
                r#"{"n": 1, "note": "", "urgent": false, "customer_id": "c-7", "gift": "yes"}"#,
            )
            .expect("an Order");
        assert_eq!(read.lost_fields, ["gift"]);
        assert_eq!(read.data["customer"], "c-7");
    }

    #[test]
    fn closures_are_erased_over_json() {
        #[derive(Deserialize)]
        struct Out {
            add: u32,
        }
        let def = build(vec![
            step("a").on_success(|d: &mut Data, o: Out| d.n += o.add),
        ])
        .expect("valid");
        let data = def.encode(&Data { n: 1 }).expect("encode");
        let s = &def.definition().steps()[0];
        assert_eq!(
            s.action().payload(&data).expect("payload"),
            serde_json::json!(1)
        );
        let next = s
            .apply_output(&data, &serde_json::json!({"add": 2}))
            .expect("apply")
            .expect("changed");
        assert_eq!(def.decode(&next).expect("decode").n, 3);
        let err = s
            .apply_output(&data, &serde_json::json!({"nope": true}))
            .expect_err("bad output");
        assert_eq!(err.context, "decoding reply output");
    }
}
