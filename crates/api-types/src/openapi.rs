//! JSON Schemas (utoipa's [`ToSchema`]) of the types whose serde form is written by hand:
//! [`HistoryEvent`] and [`FeedEvent`] (their `data` depends on their `type`) and
//! [`StateData`] (its extras depend on its `status`). Every other type derives its schema
//! next to its serde attributes. Only with the `openapi` feature.

use std::borrow::Cow;

use utoipa::openapi::schema::{
    AdditionalProperties, KnownFormat, Object, ObjectBuilder, OneOfBuilder, Schema, SchemaFormat,
    Type,
};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{PartialSchema, ToSchema};

use crate::build::BuildStatus;
use crate::events::RequeueReason;
use crate::events::{
    ArtifactDeleted, Cancelled, Claimed, EventType, Failed, FeedEvent, GaveUp, HistoryEvent,
    LeaseRenewed, Output, OutputPruned, Reproduced, ReproductionClaimed, ReproductionRequested,
    Requested, Requeued, StepFinished, StepStarted, Succeeded,
};
use crate::stream::StateData;

type Schemas = Vec<(String, RefOr<Schema>)>;

/// A reference to the component schema of `T`.
fn reference<T: ToSchema>() -> RefOr<Schema> {
    Ref::from_schema_name(T::name()).into()
}

/// Adds `T`'s schema and everything it refers to.
fn collect<T: ToSchema>(schemas: &mut Schemas) {
    schemas.push((T::name().into_owned(), T::schema()));
    T::schemas(schemas);
}

/// An RFC 3339 timestamp, as chrono writes it.
fn timestamp() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
        .build()
}

/// A string that is exactly `value`.
fn constant(value: &str) -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some([value]))
        .build()
}

/// The schema of an event's `data`, by its type.
fn payload(t: EventType) -> RefOr<Schema> {
    match t {
        EventType::Requested => reference::<Requested>(),
        EventType::Claimed => reference::<Claimed>(),
        EventType::LeaseRenewed => reference::<LeaseRenewed>(),
        EventType::StepStarted => reference::<StepStarted>(),
        EventType::StepFinished => reference::<StepFinished>(),
        EventType::Output => reference::<Output>(),
        EventType::Succeeded => reference::<Succeeded>(),
        EventType::Failed => reference::<Failed>(),
        EventType::Requeued => reference::<Requeued>(),
        EventType::Cancelled => reference::<Cancelled>(),
        EventType::GaveUp => reference::<GaveUp>(),
        EventType::ArtifactDeleted => reference::<ArtifactDeleted>(),
        EventType::ReproductionRequested => reference::<ReproductionRequested>(),
        EventType::ReproductionClaimed => reference::<ReproductionClaimed>(),
        EventType::Reproduced => reference::<Reproduced>(),
        EventType::OutputPruned => reference::<OutputPruned>(),
    }
}

fn payloads(schemas: &mut Schemas) {
    collect::<Requested>(schemas);
    collect::<Claimed>(schemas);
    collect::<LeaseRenewed>(schemas);
    collect::<StepStarted>(schemas);
    collect::<StepFinished>(schemas);
    collect::<Output>(schemas);
    collect::<Succeeded>(schemas);
    collect::<Failed>(schemas);
    collect::<Requeued>(schemas);
    collect::<Cancelled>(schemas);
    collect::<GaveUp>(schemas);
    collect::<ArtifactDeleted>(schemas);
    collect::<ReproductionRequested>(schemas);
    collect::<ReproductionClaimed>(schemas);
    collect::<Reproduced>(schemas);
    collect::<OutputPruned>(schemas);
    collect::<EventType>(schemas);
}

/// One variant per event type: `{"data": <payload>, "seq", "time", "type": "<type>"}`, with
/// the feed's `cursor` and `key` when `feed`.
fn event_schema(description: &str, feed: bool) -> RefOr<Schema> {
    let mut one_of = OneOfBuilder::new().description(Some(description));
    for t in EventType::ALL {
        let mut variant = ObjectBuilder::new().schema_type(Type::Object);
        if feed {
            variant = variant
                .property(
                    "cursor",
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .pattern(Some("^[0-9]{1,20}-[0-9]{1,20}$"))
                        .description(Some(
                            "`<transaction>-<position>`: the feed's `after` that continues after this event",
                        )),
                )
                .required("cursor");
        }
        variant = variant.property("data", payload(t)).required("data");
        if feed {
            variant = variant
                .property(
                    "key",
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .pattern(Some("^[0-9a-f]{64}$"))
                        .description(Some("The build key")),
                )
                .required("key");
        }
        variant = variant
            .property("seq", u32::schema())
            .required("seq")
            .property("time", timestamp())
            .required("time")
            .property("type", constant(t.as_str()))
            .required("type");
        one_of = one_of.item(variant);
    }
    one_of.into()
}

impl PartialSchema for HistoryEvent {
    fn schema() -> RefOr<Schema> {
        event_schema(
            "One event of a build's history: its `data` is the payload of its `type`; `seq` numbers the build's events 1, 2, 3, ... without gaps.",
            false,
        )
    }
}

impl ToSchema for HistoryEvent {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("HistoryEvent")
    }

    fn schemas(schemas: &mut Schemas) {
        payloads(schemas);
    }
}

impl PartialSchema for FeedEvent {
    fn schema() -> RefOr<Schema> {
        event_schema(
            "One event of the global feed: a history event with its build's `key` and its `cursor` in the feed.",
            true,
        )
    }
}

impl ToSchema for FeedEvent {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("FeedEvent")
    }

    fn schemas(schemas: &mut Schemas) {
        payloads(schemas);
    }
}

/// A `state` variant: `status` and these extras, nothing else.
fn state(
    status: BuildStatus,
    description: &str,
    extras: Vec<(&str, RefOr<Schema>)>,
) -> ObjectBuilder {
    let mut o = ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(description))
        .additional_properties(Some(AdditionalProperties::FreeForm(false)));
    for (name, schema) in extras {
        o = o.property(name, schema).required(name);
    }
    o.property("status", constant(status.as_str()))
        .required("status")
}

fn string() -> RefOr<Schema> {
    String::schema()
}

impl PartialSchema for StateData {
    fn schema() -> RefOr<Schema> {
        let nullable_step = OneOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::Null))
            .item(String::schema())
            .description(Some("The step that failed; `null` when no step did"));
        OneOfBuilder::new()
            .description(Some(
                "`event: state`: a state change, `{\"status\": ..., <extras>}`; the extras depend on the status (a requeue is status `queued` with `not_before` and `reason`).",
            ))
            .item(state(BuildStatus::Queued, "The build was requested.", vec![]))
            .item(state(
                BuildStatus::Queued,
                "The build went back to the queue.",
                vec![
                    ("not_before", timestamp().into()),
                    ("reason", reference::<RequeueReason>()),
                ],
            ))
            .item(state(
                BuildStatus::Running,
                "A worker took it.",
                vec![("attempt", u32::schema())],
            ))
            .item(state(
                BuildStatus::Succeeded,
                "Done; a `result` follows.",
                vec![],
            ))
            .item(state(
                BuildStatus::Failed,
                "An attempt failed; a permanent failure (`retryable: false`) is followed by a `result`.",
                vec![
                    ("error", string()),
                    ("retryable", bool::schema()),
                    ("step", nullable_step.into()),
                ],
            ))
            .item(state(
                BuildStatus::Cancelled,
                "Cancelled; a `result` follows.",
                vec![("reason", string())],
            ))
            .item(state(
                BuildStatus::GaveUp,
                "Failures used up every attempt; a `result` follows.",
                vec![("failures", u32::schema())],
            ))
            .item(state(
                BuildStatus::Expired,
                "The binary was deleted (retention).",
                vec![("reason", string())],
            ))
            .into()
    }
}

impl ToSchema for StateData {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("StateData")
    }

    fn schemas(schemas: &mut Schemas) {
        collect::<RequeueReason>(schemas);
    }
}
