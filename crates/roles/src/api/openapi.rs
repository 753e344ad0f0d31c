//! `GET /api/openapi.json`: the OpenAPI 3.1 document of the whole HTTP API.
//!
//! The schemas come from the wire types of crates/api-types (their `ToSchema`, behind that
//! crate's `openapi` feature); the operations are written here, one per route and method of
//! [`super::router`], from what each handler answers: every status code it can give, the
//! shared error body, the headers (`x-request-id` on every answer, `Retry-After`, the
//! download's `ETag`, `Content-Range`, ...), the query parameters with their limits, the event
//! stream's events. A few values come from the config (the long-poll's cap, the download
//! wait, whether downloads redirect, who needs a token), so the document is made per request
//! from the server's own config.
//!
//! crates/roles/tests/contract.rs checks that the document and the router list the same
//! routes, and runs schemathesis against a live server with it.

use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use cbs_api_types as wire;
use cbs_config::{AccessMode, Config, StorageBackend};
use serde_json::{json, Value};
use utoipa::openapi::content::Content;
use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::header::Header;
use utoipa::openapi::link::Link;
use utoipa::openapi::path::{HttpMethod, Operation, OperationBuilder, Parameter, ParameterIn};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::response::{ResponseBuilder, ResponsesBuilder};
use utoipa::openapi::schema::{
    ArrayBuilder, ComponentsBuilder, KnownFormat, Object, ObjectBuilder, OneOfBuilder, Schema,
    SchemaFormat, Type,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{InfoBuilder, OpenApiBuilder, Paths, Ref, RefOr, Required, Tag};
use utoipa::ToSchema;

use super::ApiState;

/// `GET /api/openapi.json`.
pub async fn serve(State(state): State<ApiState>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        document(&state.app.config).to_string(),
    )
        .into_response()
}

/// What `GET /metrics` answers (`cbs_metrics::CONTENT_TYPE`; the contract test compares).
const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// An event id as the stream's `after` and `Last-Event-ID` take it: `<seq>`, `<seq>.<i>` or
/// `<seq>.<c>.<i>` (surrounding space and a `+` are read too).
const EVENT_ID: &str = "^\\s*\\+?[0-9]+(\\.\\+?[0-9]+){0,2}\\s*$";

/// The build key as a path parameter.
const KEY_PATTERN: &str = "^[0-9a-f]{64}$";

/// The document for a server with this config.
pub fn document(config: &Config) -> Value {
    let mut doc = Doc::new(config);
    doc.health();
    doc.builds();
    doc.downloads();
    doc.admin();
    doc.web();
    doc.meta();
    doc.metrics();
    doc.finish()
}

/// What the document depends on in the config.
struct Settings {
    token_mode: bool,
    public_reads: bool,
    max_long_poll: Duration,
    download_wait: Duration,
    download_retry_after: u64,
    redirects: bool,
}

/// The document being written, and the response headers it marks required (utoipa's
/// `Header` has no `required`; they are set in the JSON at the end).
struct Doc {
    settings: Settings,
    paths: Paths,
    required_headers: Vec<(String, &'static str, String, &'static str)>,
}

/// One documented answer of an operation.
struct Answer {
    status: u16,
    response: ResponseBuilder,
    required: Vec<&'static str>,
    /// Made by the HTTP layer before any route: no `x-request-id`.
    bare: bool,
}

impl Answer {
    fn new(status: u16, description: impl Into<String>) -> Answer {
        Answer {
            status,
            response: ResponseBuilder::new().description(description),
            required: Vec::new(),
            bare: false,
        }
    }

    /// hyper's own answer to a request head over [`super::MAX_HEAD`]: possible on every
    /// route, before any of ours sees the request.
    fn head_too_large() -> Answer {
        Answer {
            bare: true,
            ..Answer::new(
                431,
                format!(
                    "The request line and headers together are too large (over {} KiB when the HTTP layer checks): answered by the HTTP layer before any route, with no body and no `x-request-id`; the connection is closed.",
                    super::MAX_HEAD / 1024
                ),
            )
        }
    }

    fn content(mut self, media_type: &str, schema: impl Into<RefOr<Schema>>) -> Answer {
        self.response = self
            .response
            .content(media_type, Content::new(Some(schema.into())));
        self
    }

    fn json(self, schema: impl Into<RefOr<Schema>>) -> Answer {
        self.content("application/json", schema)
    }

    fn header(
        mut self,
        name: &'static str,
        schema: impl Into<RefOr<Schema>>,
        description: &str,
        required: bool,
    ) -> Answer {
        self.response = self.response.header(
            name,
            Header::builder()
                .schema(schema)
                .description(Some(description))
                .build(),
        );
        if required {
            self.required.push(name);
        }
        self
    }

    fn link(mut self, name: &str, operation_id: &str, description: &str) -> Answer {
        self.response = self.response.link(
            name,
            Link::builder()
                .operation_id(operation_id)
                .parameter("key", "$response.body#/result/key")
                .description(description)
                .build(),
        );
        self
    }
}

/// Component schema `T`.
fn schema_ref<T: ToSchema>() -> RefOr<Schema> {
    Ref::from_schema_name(T::name()).into()
}

/// A component schema by name.
fn named(name: &str) -> RefOr<Schema> {
    Ref::from_schema_name(name).into()
}

fn string() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String)
}

fn integer(min: u64, max: u64) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(min))
        .maximum(Some(max))
}

/// `{"result": <schema>}`.
fn envelope(result: RefOr<Schema>, description: &str) -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(description))
        .property("result", result)
        .required("result")
        .build()
}

/// An error answer: the shared error body.
fn error(status: u16, description: impl Into<String>) -> Answer {
    Answer::new(status, description).json(schema_ref::<wire::ErrorBody>())
}

/// 503 with `Retry-After` when the server says when to come back.
fn unavailable(description: &str) -> Answer {
    error(
        503,
        format!(
            "{description}. Also when the database or artifact storage is unavailable (the message says so; nothing was changed)."
        ),
    )
    .header(
        "Retry-After",
        integer(1, u64::from(u32::MAX)),
        "Seconds to wait before asking again, when the server knows",
        false,
    )
}

fn too_many(description: &str) -> Answer {
    error(429, description.to_owned()).header(
        "Retry-After",
        integer(1, u64::from(u32::MAX)),
        "Seconds until a new build is allowed (rate and queue limits; a refused wait has none)",
        false,
    )
}

fn bad_key_or_params(params: &str) -> Answer {
    error(
        400,
        format!("The key is not 64 lower-case hex digits{params}; the message says which."),
    )
}

fn not_found() -> Answer {
    error(404, "No build has this key.")
}

fn unauthorized(what: &str) -> Answer {
    error(
        401,
        format!("An `Authorization` header that is not `Bearer <a known token>`{what}. With `WWW-Authenticate`."),
    )
    .header(
        "WWW-Authenticate",
        string(),
        "`Bearer realm=\"caddy-build-server\"`",
        true,
    )
}

fn query(name: &str, schema: impl Into<RefOr<Schema>>, description: &str) -> Parameter {
    query_with_example(name, schema, description, None)
}

fn query_with_example(
    name: &str,
    schema: impl Into<RefOr<Schema>>,
    description: &str,
    example: Option<Value>,
) -> Parameter {
    Parameter::builder()
        .name(name)
        .parameter_in(ParameterIn::Query)
        .required(Required::False)
        .schema(Some(schema))
        .description(Some(description))
        .example(example)
        .build()
}

fn request_header(name: &str, schema: impl Into<RefOr<Schema>>, description: &str) -> Parameter {
    Parameter::builder()
        .name(name)
        .parameter_in(ParameterIn::Header)
        .required(Required::False)
        .schema(Some(schema))
        .description(Some(description))
        .build()
}

fn key_param() -> Parameter {
    Parameter::builder()
        .name("key")
        .parameter_in(ParameterIn::Path)
        .required(Required::True)
        .schema(Some(
            string()
                .pattern(Some(KEY_PATTERN))
                .min_length(Some(64))
                .max_length(Some(64)),
        ))
        .description(Some(
            "The build key: the SHA-256 of the resolved request, 64 lower-case hex digits (`result.key` of a build's status)",
        ))
        .example(Some(json!(
            "8b1a9953c4611296a827abf8c47804d7e6c49c6b8e4d8ff1e2e8d1c0c3f3a2b1"
        )))
        .build()
}

/// `after` of a history page, or of a long-poll.
fn seq_param(description: &str) -> Parameter {
    query("after", integer(0, u64::from(u32::MAX)), description)
}

fn limit_param(max: u32, description: &str) -> Parameter {
    query("limit", integer(1, u64::from(max)), description)
}

impl Doc {
    fn new(config: &Config) -> Doc {
        let s3 = &config.storage.s3;
        Doc {
            settings: Settings {
                token_mode: config.access.mode == AccessMode::Token,
                public_reads: config.access.public_reads,
                max_long_poll: config.api.max_long_poll,
                download_wait: config.api.download_wait,
                download_retry_after: config.api.download_retry_after.as_secs().max(1),
                redirects: config.storage.backend == StorageBackend::S3 && s3.presign_downloads,
            },
            paths: Paths::new(),
            required_headers: Vec::new(),
        }
    }

    /// Adds an operation with its answers; every answer carries `x-request-id`.
    fn op(
        &mut self,
        method: HttpMethod,
        path: &str,
        operation: OperationBuilder,
        answers: Vec<Answer>,
    ) {
        let mut responses = ResponsesBuilder::new();
        let method_name = method_name(&method);
        for answer in answers.into_iter().chain([Answer::head_too_large()]) {
            let answer = if answer.bare {
                answer
            } else {
                answer.header(
                    "x-request-id",
                    string(),
                    "This request's id (also in an error's `error.id`)",
                    true,
                )
            };
            for h in &answer.required {
                self.required_headers.push((
                    path.to_owned(),
                    method_name,
                    answer.status.to_string(),
                    h,
                ));
            }
            responses = responses.response(answer.status.to_string(), answer.response.build());
        }
        let operation: Operation = operation.responses(responses.build()).build();
        self.paths.add_path_operation(path, vec![method], operation);
    }

    /// Who may call routes that read: anyone, or (token mode without `public_reads`) a token.
    fn read_security(&self) -> Vec<SecurityRequirement> {
        if self.settings.token_mode && !self.settings.public_reads {
            vec![SecurityRequirement::new("bearer", Vec::<String>::new())]
        } else {
            vec![
                SecurityRequirement::default(),
                SecurityRequirement::new("bearer", Vec::<String>::new()),
            ]
        }
    }

    /// Who may submit builds: anyone, or (token mode) a token.
    fn submit_security(&self) -> Vec<SecurityRequirement> {
        if self.settings.token_mode {
            vec![SecurityRequirement::new("bearer", Vec::<String>::new())]
        } else {
            vec![
                SecurityRequirement::default(),
                SecurityRequirement::new("bearer", Vec::<String>::new()),
            ]
        }
    }

    fn public_security(&self) -> Vec<SecurityRequirement> {
        vec![SecurityRequirement::default()]
    }

    fn read_401(&self) -> Answer {
        if self.settings.token_mode && !self.settings.public_reads {
            unauthorized(", or none (this server needs a token to read)")
        } else {
            unauthorized("")
        }
    }

    fn submit_401(&self) -> Answer {
        if self.settings.token_mode {
            unauthorized(", or none (this server builds only for API tokens)")
        } else {
            unauthorized("")
        }
    }

    fn health(&mut self) {
        let text = || string();
        self.op(
            HttpMethod::Get,
            "/healthz",
            OperationBuilder::new()
                .operation_id(Some("getHealthz"))
                .tag("health")
                .summary(Some("The process is alive"))
                .securities(Some(self.public_security())),
            vec![Answer::new(200, "`ok`").content("text/plain; charset=utf-8", text())],
        );
        self.op(
            HttpMethod::Get,
            "/readyz",
            OperationBuilder::new()
                .operation_id(Some("getReadyz"))
                .tag("health")
                .summary(Some("The database answers and its schema is current"))
                .securities(Some(self.public_security())),
            vec![
                Answer::new(200, "`ready`").content("text/plain; charset=utf-8", text()),
                error(503, "Not ready: the database is unavailable or not migrated. With `Retry-After: 5`.")
                    .header("Retry-After", integer(1, 3600), "Seconds to wait", true),
            ],
        );
    }

    /// The query parameters of a build request (`POST /api/build` without a body,
    /// `/api/download`, `/api/compat`); with examples of `os` and `arch` when `examples`.
    fn request_params(examples: bool) -> Vec<Parameter> {
        use cbs_domain::module::{MAX_PATH_LEN, MAX_VERSION_LEN};
        let (oses, arches) = platform_names();
        let platforms = cbs_domain::platform::PLATFORMS
            .iter()
            .map(|(o, a)| format!("{o}/{a}"))
            .collect::<Vec<_>>()
            .join(", ");
        // Shapes every accepted value has (the server checks more; a parameter's schema
        // admits all the server accepts): module paths of letters, digits and `. _ ~ / -`,
        // versions of letters, digits and `. _ + -` (empty: latest).
        let path = format!("[A-Za-z0-9._~/-]{{1,{MAX_PATH_LEN}}}");
        let version = format!("[A-Za-z0-9._+-]{{0,{MAX_VERSION_LEN}}}");
        let example = |value: &str| examples.then(|| json!(value));
        let list = |name: &str, pattern: String, description: &str| {
            Parameter::builder()
                .name(name)
                .parameter_in(ParameterIn::Query)
                .required(Required::False)
                .schema(Some(
                    ArrayBuilder::new()
                        .items(string().pattern(Some(pattern)))
                        .max_items(Some(cbs_domain::MAX_PLUGINS)),
                ))
                .explode(Some(true))
                .description(Some(description))
                .build()
        };
        let caddy_version = |name: &str, description: &str| {
            query(
                name,
                string().pattern(Some(format!("^{version}$"))),
                description,
            )
        };
        vec![
            query_with_example(
                "os",
                string().enum_values(Some(oses)),
                &format!("GOOS; required. Valid pairs with `arch`: {platforms}"),
                example("linux"),
            ),
            query_with_example(
                "arch",
                string().enum_values(Some(arches)),
                "GOARCH; required (see `os` for the valid pairs)",
                example("amd64"),
            ),
            query(
                "arm",
                string().enum_values(Some(["5", "6", "7", ""])),
                "GOARM, only with `arch=arm` (empty: none)",
            ),
            caddy_version(
                "version",
                "Caddy's version: `latest` (the default), an absolute version like `v2.8.4`, or a branch, tag or commit the module proxy resolves (letters, digits, `. _ -`, at most 100 bytes)",
            ),
            caddy_version(
                "caddy_version",
                "The same as `version` (the JSON body's name); not both",
            ),
            list(
                "p",
                format!("^{path}(@{version})?$"),
                "A plugin, `module[@version]`, repeated for each (at most 50, no module twice, not Caddy itself)",
            ),
            list(
                "r",
                format!("^{path}={path}(@{version})?$"),
                "A replacement, `old=new[@version]`, repeated for each (at most 50). Needs the admin scope unless `packages.replaceable` lists `old`.",
            ),
            query(
                "force",
                string(),
                "`1`, `true` or `yes`: rebuild a build that ended without a binary (failed, gave up, cancelled); anything else is false. In token mode, admin tokens only.",
            ),
            query(
                "idempotency",
                string(),
                "Accepted and ignored (caddyserver.com's clients send it)",
            ),
        ]
    }

    fn builds(&mut self) {
        let build_response = || named("BuildResponse");
        let submission = RequestBodyBuilder::new()
            .description(Some(
                "The request as JSON. Without a body (or with one of only whitespace) the request is read from the query parameters instead; both at once are a 400.",
            ))
            .required(Some(Required::False))
            .content(
                "application/json",
                Content::builder()
                    .schema(Some(schema_ref::<wire::BuildSubmission>()))
                    .example(Some(json!({"os": "linux", "arch": "amd64"})))
                    .build(),
            )
            .build();
        let links = |a: Answer| {
            a.link("status", "getBuild", "The build's status")
                .link("history", "getBuildHistory", "The build's events")
                .link("download", "getBuildDownload", "The build's binary")
                .link("cancel", "cancelBuild", "Cancel it (admin)")
        };
        let submit_errors = |doc: &Doc| -> Vec<Answer> {
            vec![
                error(400, "The request is not valid (a platform, module path or version; a parameter unknown or given twice; a JSON body and query parameters at once), or the module proxy does not know a module or version. The message says what."),
                doc.submit_401(),
                error(403, "A plugin is not allowed here (`packages.deny`, or not in the catalog when the server builds only its catalog), a replacement needs the admin scope, or `force` needs it (token mode)."),
                too_many("Too many new builds from this client: per minute (`api.submissions_per_minute`) or queued at once (`api.max_queued_per_client`). Joining a build that exists is never limited."),
                unavailable("The module proxy is unavailable"),
            ]
        };
        let mut answers = vec![
            links(
                Answer::new(200, "The build exists and has ended: `complete` (download it), or failed for good, gave up or was cancelled (`force` rebuilds those).")
                    .json(build_response()),
            ),
            links(
                Answer::new(202, "The build is queued or running (new, joined, or reopened).")
                    .json(build_response()),
            ),
        ];
        answers.extend(submit_errors(self));
        answers.push(error(
            408,
            "The request body did not arrive within `api.body_timeout`; the connection is closed.",
        ));
        answers.push(error(
            413,
            format!("The request body is larger than {} bytes.", super::MAX_BODY),
        ));
        answers.push(error(
            414,
            format!(
                "The query string is longer than {} bytes.",
                super::params::MAX_QUERY
            ),
        ));
        self.op(
            HttpMethod::Post,
            "/api/build",
            OperationBuilder::new()
                .operation_id(Some("postBuild"))
                .tag("builds")
                .summary(Some("Queue a build, or join the one with the same request"))
                .description(Some("Versions are resolved through the module proxy first; the key is the SHA-256 of the resolved request, so identical requests share one build. Only new work (a new key, or a reopened build) counts against the client's limits."))
                .parameters(Some(Self::request_params(false)))
                .request_body(Some(submission))
                .securities(Some(self.submit_security())),
            answers,
        );

        let max_poll = humantime::format_duration(self.settings.max_long_poll).to_string();
        self.op(
            HttpMethod::Get,
            "/api/build/{key}",
            OperationBuilder::new()
                .operation_id(Some("getBuild"))
                .tag("builds")
                .summary(Some("A build's status; with `wait`, a long-poll"))
                .parameter(key_param())
                .parameter(query(
                    "wait",
                    string().examples(["30s", "2m", "500ms"]),
                    &format!("How long to wait for an event after `after`: a duration like `30s`, `2m` or `500ms` (any humantime duration); at most {max_poll} (`api.max_long_poll`; longer waits are cut to it). Without it (or 0) the status is answered at once."),
                ))
                .parameter(seq_param(
                    "With `wait`: answer when the build has an event with a higher `seq` (default: its `last_seq` now)",
                ))
                .securities(Some(self.read_security())),
            vec![
                Answer::new(200, "The build's status (after the wait, changed or not).")
                    .json(build_response()),
                bad_key_or_params(", `wait` is not a duration, `after` is not a number, or a parameter is unknown"),
                self.read_401(),
                not_found(),
                too_many("This client holds too many waits at once (`api.max_waits_per_client`; only with `wait`)."),
                unavailable("The server holds as many waits as it can (`api.max_waits`, `Retry-After: 5`; only with `wait`)"),
            ],
        );

        self.op(
            HttpMethod::Get,
            "/api/build/{key}/history",
            OperationBuilder::new()
                .operation_id(Some("getBuildHistory"))
                .tag("builds")
                .summary(Some("A build's events, a page at a time"))
                .parameter(key_param())
                .parameter(seq_param(
                    "The page starts after this `seq` (default 0); `next` of the previous page",
                ))
                .parameter(limit_param(
                    super::builds::HISTORY_PAGE,
                    &format!(
                        "Events per page, 1 to {} (the default)",
                        super::builds::HISTORY_PAGE
                    ),
                ))
                .securities(Some(self.read_security())),
            vec![
                Answer::new(
                    200,
                    "A page of events; `next` is the `after` of the next page (null on the last).",
                )
                .json(named("HistoryResponse")),
                bad_key_or_params(
                    ", `after` or `limit` is out of range, or a parameter is unknown",
                ),
                self.read_401(),
                not_found(),
                unavailable("The database is unavailable"),
            ],
        );

        self.op(
            HttpMethod::Get,
            "/api/build/{key}/output",
            OperationBuilder::new()
                .operation_id(Some("getBuildOutput"))
                .tag("builds")
                .summary(Some("A build's output, a page of chunks at a time"))
                .description(Some("What the build's steps printed, in chunks of lines, in order; each attempt keeps at most `worker.output_cap_bytes` (a chunk marked `truncated` says how much more there was). `pruned_attempts` tells which attempts' output retention removed (`janitor.output_retention`)."))
                .parameter(key_param())
                .parameter(query(
                    "after",
                    string()
                        .pattern(Some(r"^[0-9]{1,9}\.[0-9]{1,9}$"))
                        .max_length(Some(19)),
                    "The page starts after this chunk, `<attempt>.<seq>` (default: from the first); `next` of the previous page",
                ))
                .parameter(limit_param(
                    super::builds::OUTPUT_PAGE,
                    &format!(
                        "Chunks per page, 1 to {} (the default)",
                        super::builds::OUTPUT_PAGE
                    ),
                ))
                .securities(Some(self.read_security())),
            vec![
                Answer::new(
                    200,
                    "A page of output; `next` is the `after` of the next page (null on the last).",
                )
                .json(named("OutputResponse")),
                bad_key_or_params(", `after` or `limit` is malformed, or a parameter is unknown"),
                self.read_401(),
                not_found(),
                unavailable("The database is unavailable"),
            ],
        );

        let event_types: Vec<&str> = wire::EventType::ALL.iter().map(|t| t.as_str()).collect();
        self.op(
            HttpMethod::Get,
            "/api/events",
            OperationBuilder::new()
                .operation_id(Some("getEvents"))
                .tag("builds")
                .summary(Some("The global audit feed: every build's events"))
                .description(Some("Paged by the writing transaction, and only up to the oldest transaction still running, so no event that commits late is skipped. Poll with the last `next`."))
                .parameter(query(
                    "after",
                    string().pattern(Some("^[0-9]{1,20}-[0-9]{1,20}$")),
                    "A cursor, `<transaction>-<position>` (`next` of the previous page, `0-0` at the start, the default)",
                ))
                .parameter(limit_param(super::builds::FEED_PAGE, &format!("Events per page, 1 to {} (default 100)", super::builds::FEED_PAGE)))
                .parameter(query(
                    "last",
                    integer(1, u64::from(super::builds::FEED_PAGE)),
                    "Instead of `after`: the newest N events (of the given types, among the last 10,000), oldest first; `next` is where to read on from",
                ))
                .parameter(
                    Parameter::builder()
                        .name("type")
                        .parameter_in(ParameterIn::Query)
                        .required(Required::False)
                        .schema(Some(string().pattern(Some(format!(
                            "^({types})?(,({types})?)*$",
                            types = event_types.join("|")
                        )))))
                        .description(Some("Only events of these types, comma-separated (`type=succeeded,failed`; empty items are skipped)"))
                        .build(),
                )
                .securities(Some(self.read_security())),
            vec![
                Answer::new(200, "A page of the feed.").json(named("FeedResponse")),
                error(400, "A cursor, limit or type that is not valid, or an unknown parameter."),
                self.read_401(),
                unavailable("The database is unavailable"),
            ],
        );

        self.op(
            HttpMethod::Get,
            "/api/resolve",
            OperationBuilder::new()
                .operation_id(Some("resolveBuild"))
                .tag("builds")
                .summary(Some("What a build request resolves to, and its build key"))
                .description(Some("The parameters of `POST /api/build` (but not `force`), under the same rules; every `latest` and query is made absolute. Nothing is recorded, and no limit is charged. `build` is the build of that key if it exists (a `complete` one can be downloaded at once)."))
                .parameters(Some(
                    Self::request_params(true)
                        .into_iter()
                        .filter(|p| p.name != "force"),
                ))
                .securities(Some(self.submit_security())),
            vec![
                Answer::new(200, "The resolved request, its key, and its build (or null).")
                    .json(named("ResolutionResponse")),
                error(400, "The request is not valid, or the module proxy does not know a module or version. The message says what."),
                self.submit_401(),
                error(403, "A plugin is not allowed here, or a replacement needs the admin scope."),
                unavailable("The module proxy or the database is unavailable"),
            ],
        );

        self.op(
            HttpMethod::Get,
            "/api/artifacts/{sha256}",
            OperationBuilder::new()
                .operation_id(Some("getBuildsByArtifact"))
                .tag("downloads")
                .summary(Some("The builds whose binary has this SHA-256"))
                .description(Some("Did this server build these bytes? `caddy-build-server client verify FILE` asks this, then checks the signature and the binary's build information against the build's request."))
                .parameter(
                    Parameter::builder()
                        .name("sha256")
                        .parameter_in(ParameterIn::Path)
                        .required(Required::True)
                        .schema(Some(string().pattern(Some("^[0-9a-fA-F]{64}$"))))
                        .description(Some("The binary's SHA-256, 64 hex digits"))
                        .build(),
                )
                .securities(Some(self.read_security())),
            vec![
                Answer::new(200, "The builds (newest first; at most 10).")
                    .json(named("BuildsResponse")),
                error(400, "Not 64 hex digits."),
                self.read_401(),
                error(404, "No build of this server has a binary with these bytes."),
                unavailable("The database is unavailable"),
            ],
        );

        self.op(
            HttpMethod::Get,
            "/api/artifacts",
            OperationBuilder::new()
                .operation_id(Some("getBuildsByModules"))
                .tag("downloads")
                .summary(Some("The builds whose binary links exactly these modules"))
                .description(Some("By the module-list hash a signature's trusted comment states (`modules_sha256` in each build's `succeeded` event), any platform. `caddy-build-server client verify FILE` asks this for a binary this server never built, to say whether it built that request to other bytes."))
                .parameter(
                    Parameter::builder()
                        .name("modules_sha256")
                        .parameter_in(ParameterIn::Query)
                        .required(Required::True)
                        .schema(Some(string().pattern(Some("^[0-9a-fA-F]{64}$"))))
                        .description(Some("The module-list hash, 64 hex digits"))
                        .build(),
                )
                .securities(Some(self.read_security())),
            vec![
                Answer::new(200, "The builds (newest first; at most 20).")
                    .json(named("BuildsResponse")),
                error(400, "Not 64 hex digits, missing, or an unknown parameter."),
                self.read_401(),
                error(404, "No build of this server links these modules (or they were built before the hash was recorded)."),
                unavailable("The database is unavailable"),
            ],
        );

        self.op(
            HttpMethod::Get,
            "/api/options",
            OperationBuilder::new()
                .operation_id(Some("getOptions"))
                .tag("builds")
                .summary(Some("The choices a build request has on this server"))
                .description(Some("Caddy versions the module proxy lists (asked at most every five minutes; `[]` when it cannot be asked), the target platforms, and what may be replaced. Query parameters are ignored."))
                .securities(Some(self.read_security())),
            vec![
                Answer::new(200, "The options.").json(named("OptionsResponse")),
                self.read_401(),
            ],
        );

        self.op(
            HttpMethod::Get,
            "/api/packages",
            OperationBuilder::new()
                .operation_id(Some("getPackages"))
                .tag("builds")
                .summary(Some(
                    "The plugin catalog, with build counts (cached for a minute)",
                ))
                .description(Some("Query parameters are ignored."))
                .securities(Some(self.read_security())),
            vec![
                Answer::new(
                    200,
                    "The catalog (`packages.catalog`), in caddyserver.com's shape.",
                )
                .json(named("PackagesResponse")),
                self.read_401(),
                unavailable("The database is unavailable"),
            ],
        );

        self.op(
            HttpMethod::Get,
            "/api/build/{key}/events",
            OperationBuilder::new()
                .operation_id(Some("getBuildEvents"))
                .tag("builds")
                .summary(Some("A build's progress as Server-Sent Events"))
                .description(Some("Events: `state` (every state change), `step` (a step began), `log` (a line of output, or a step's summary), `result` (how the build ended; the stream ends after it). Each has an id, `<seq>`, `<seq>.<i>` (a further message of event `seq`) or `<seq>.<c>.<i>` (line `i` of output chunk `c` after event `seq`); reconnect with `Last-Event-ID` (or `after`) to get exactly what was missed, then live events. Keep-alive comments every 15 s. A finished build's stream replays and ends."))
                .parameter(key_param())
                .parameter(query(
                    "after",
                    string().pattern(Some(EVENT_ID)),
                    "Resume after this event id (as `Last-Event-ID`, which wins when both are sent)",
                ))
                .parameter(request_header(
                    "Last-Event-ID",
                    string().pattern(Some(EVENT_ID)),
                    "The id of the last event seen (EventSource sends it on reconnect)",
                ))
                .securities(Some(self.read_security())),
            vec![
                Answer::new(200, "The event stream. Each event's `data` is one line of JSON, whose shape its `event` name gives.")
                    .content("text/event-stream", stream_event_schema())
                    .header("Cache-Control", string(), "`no-cache`", true),
                bad_key_or_params(", `Last-Event-ID` or `after` is not an event id, or a parameter is unknown"),
                self.read_401(),
                not_found(),
                too_many("This client holds too many waits at once (`api.max_waits_per_client`)."),
                unavailable("The server holds as many waits as it can (`api.max_waits`, `Retry-After: 5`)"),
            ],
        );
    }

    fn downloads(&mut self) {
        let binary = || {
            string()
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
                .content_media_type("application/octet-stream")
        };
        let binary_answers = |status: u16, description: &str| -> Answer {
            let mut a = Answer::new(status, description)
                .content("application/octet-stream", binary())
                .header(
                    "Content-Length",
                    integer(0, u64::MAX >> 1),
                    "Bytes in this answer",
                    true,
                )
                .header(
                    "Content-Disposition",
                    string(),
                    "`attachment; filename=caddy` (`caddy.exe` on Windows)",
                    true,
                )
                .header(
                    "ETag",
                    string().pattern(Some("^\"[0-9a-f]{64}\"$")),
                    "The binary's SHA-256, quoted",
                    true,
                )
                .header(
                    "Accept-Ranges",
                    string().enum_values(Some(["bytes"])),
                    "`bytes`",
                    true,
                )
                .header(
                    "Cache-Control",
                    string(),
                    "`public, max-age=31536000, immutable`",
                    true,
                )
                .header(
                    "x-caddy-build-key",
                    string().pattern(Some(KEY_PATTERN)),
                    "The build key",
                    true,
                )
                .header(
                    "x-checksum-sha256",
                    string().pattern(Some("^[0-9a-f]{64}$")),
                    "The binary's SHA-256",
                    true,
                );
            if status == 206 {
                a = a.header(
                    "Content-Range",
                    string().pattern(Some("^bytes [0-9]+-[0-9]+/[0-9]+$")),
                    "`bytes <first>-<last>/<size>`",
                    true,
                );
            }
            a
        };
        // What a download answers for a build that has ended without a binary.
        let ended = || {
            vec![
                error(410, "The build was cancelled, or its files were deleted after a long time without downloads (request it again to rebuild it)."),
                error(422, "The build failed for good (compile error, unknown version, a binary that does not match the request)."),
            ]
        };
        let range = request_header(
            "Range",
            string(),
            "One byte range, `bytes=<first>-[<last>]` or `bytes=-<suffix>` (several ranges: the whole file)",
        );
        let if_none_match = request_header(
            "If-None-Match",
            string(),
            "ETags (or `*`); one that matches gives 304",
        );
        let redirect = |doc: &Doc| -> Option<Answer> {
            doc.settings.redirects.then(|| {
                Answer::new(302, "(GET, S3 with `storage.s3.presign_downloads`) A redirect to a short-lived presigned URL of the binary.")
                    .header("Location", string(), "The presigned URL", true)
                    .header("x-caddy-build-key", string().pattern(Some(KEY_PATTERN)), "The build key", true)
                    .header("Cache-Control", string(), "`no-store`", true)
            })
        };
        let artifact_answers = |doc: &Doc| -> Vec<Answer> {
            let mut v = vec![
                binary_answers(200, "The binary (HEAD: its headers only)."),
                binary_answers(206, "The requested byte range."),
                Answer::new(304, "`If-None-Match` names the binary's ETag.").header(
                    "ETag",
                    string().pattern(Some("^\"[0-9a-f]{64}\"$")),
                    "The binary's SHA-256, quoted",
                    true,
                ),
                error(416, "The range is outside the binary.").header(
                    "Content-Range",
                    string().pattern(Some("^bytes \\*/[0-9]+$")),
                    "`bytes */<size>`",
                    true,
                ),
            ];
            v.extend(redirect(doc));
            v.extend(ended());
            v
        };

        for (path, get_id, head_id) in [
            (
                "/api/build/{key}/download",
                "getBuildDownload",
                "headBuildDownload",
            ),
            (
                "/api/download/{key}",
                "getDownloadByKey",
                "headDownloadByKey",
            ),
        ] {
            for (method, id) in [(HttpMethod::Get, get_id), (HttpMethod::Head, head_id)] {
                let mut answers = artifact_answers(self);
                answers.push(
                    Answer::new(202, "The build is queued or running (or failed and will be retried): its status.")
                        .json(named("BuildResponse")),
                );
                answers.push(bad_key_or_params(""));
                answers.push(self.read_401());
                answers.push(not_found());
                answers.push(unavailable("The build gave up after retryable failures, or its files are missing from storage"));
                self.op(
                    method,
                    path,
                    OperationBuilder::new()
                        .operation_id(Some(id))
                        .tag("downloads")
                        .summary(Some("A build's binary, streamed: Range, ETag, HEAD"))
                        .parameter(key_param())
                        .parameter(range.clone())
                        .parameter(if_none_match.clone())
                        .securities(Some(self.read_security())),
                    answers,
                );
            }
        }

        for (path, get_id, head_id, media_type, what) in [
            ("/api/build/{key}/download.minisig", "getBuildSignature", "headBuildSignature", "text/plain; charset=utf-8", "The binary's minisign signature (prehashed `ED`); its trusted comment names the build key, Caddy's version, the module-list hash, replacements and the SHA-256, all read back from the binary."),
            ("/api/build/{key}/download.sha256", "getBuildChecksum", "headBuildChecksum", "text/plain; charset=utf-8", "`<sha256>  caddy`, for `sha256sum -c`."),
            ("/api/build/{key}/provenance", "getBuildProvenance", "headBuildProvenance", "application/vnd.in-toto+json", "An in-toto Statement v1 with a SLSA provenance v1 predicate."),
            ("/api/build/{key}/provenance.minisig", "getBuildProvenanceSignature", "headBuildProvenanceSignature", "text/plain; charset=utf-8", "The provenance's minisign signature."),
            ("/api/build/{key}/reproduction", "getBuildReproduction", "headBuildReproduction", "application/vnd.in-toto+json", "The second builder's in-toto Statement about the same binary, after a matched reproducibility check: the same subject and request, its own worker, builder image and times."),
            ("/api/build/{key}/reproduction.minisig", "getBuildReproductionSignature", "headBuildReproductionSignature", "text/plain; charset=utf-8", "The second builder's statement's minisign signature."),
        ] {
            let body: RefOr<Schema> = if media_type.ends_with("+json") {
                provenance_schema().into()
            } else {
                string().into()
            };
            for (method, id) in [(HttpMethod::Get, get_id), (HttpMethod::Head, head_id)] {
                let mut answers = vec![
                    Answer::new(200, what)
                        .content(media_type, body.clone())
                        .header("Content-Disposition", string(), "`attachment; filename=<name>`", true)
                        .header("Cache-Control", string(), "`public, max-age=31536000, immutable`", true)
                        .header("x-caddy-build-key", string().pattern(Some(KEY_PATTERN)), "The build key", true),
                    Answer::new(202, "The build is queued or running (or failed and will be retried): its status.")
                        .json(named("BuildResponse")),
                    bad_key_or_params(""),
                    self.read_401(),
                    error(404, "No build has this key, or it was published before artifacts were signed (it has no such file), or (reproduction) no second builder built the same bytes yet."),
                    unavailable("The build gave up after retryable failures, or its files are missing from storage"),
                ];
                answers.extend(ended());
                self.op(
                    method,
                    path,
                    OperationBuilder::new()
                        .operation_id(Some(id))
                        .tag("downloads")
                        .summary(Some(what.split(':').next().unwrap_or(what).split('.').next().unwrap_or(what)))
                        .parameter(key_param())
                        .securities(Some(self.read_security())),
                    answers,
                );
            }
        }

        self.op(
            HttpMethod::Get,
            "/api/public-key",
            OperationBuilder::new()
                .operation_id(Some("getPublicKey"))
                .tag("downloads")
                .summary(Some("The signing public key, in minisign's format"))
                .securities(Some(self.public_security())),
            vec![
                Answer::new(
                    200,
                    "The public key file (`untrusted comment:` line, then the key).",
                )
                .content("text/plain; charset=utf-8", string())
                .header("Cache-Control", string(), "`public, max-age=300`", true),
                error(503, "This server has no signing public key configured."),
            ],
        );

        let wait = humantime::format_duration(self.settings.download_wait).to_string();
        let retry = self.settings.download_retry_after;
        for (path, get_id, head_id) in [
            ("/api/download", "getDownload", "headDownload"),
            ("/api/compat", "getCompat", "headCompat"),
        ] {
            for (method, id) in [(HttpMethod::Get, get_id), (HttpMethod::Head, head_id)] {
                let mut answers = artifact_answers(self);
                answers.extend([
                    error(400, "The request is not valid, or the module proxy does not know a module or version (as `POST /api/build`)."),
                    self.submit_401(),
                    error(403, "A plugin is not allowed, a replacement or `force` needs the admin scope (as `POST /api/build`)."),
                    too_many("Too many new builds from this client (as `POST /api/build`), or too many open waits (`api.max_waits_per_client`)."),
                    error(414, format!("The query string is longer than {} bytes.", super::params::MAX_QUERY)),
                    unavailable(&format!("The build is not done after waiting {wait} (`api.download_wait`): `Retry-After: {retry}` (`api.download_retry_after`) and `x-caddy-build-key`; the build goes on. Or the build gave up, the module proxy or the server's waits are full (`api.max_waits`)"))
                        .header("x-caddy-build-key", string().pattern(Some(KEY_PATTERN)), "The build waited for (after a wait that ran out)", false),
                ]);
                self.op(
                    method,
                    path,
                    OperationBuilder::new()
                        .operation_id(Some(id))
                        .tag("downloads")
                        .summary(Some("Resolve, build once, wait, then the binary (what `caddy upgrade` and `caddy add-package` call)"))
                        .description(Some(format!("Never a 2xx without the binary (Caddy's CLI installs any answer below 400): while the build runs, this waits up to {wait}, then answers 503 with `Retry-After`. A client that goes away does not cancel the build.")))
                        .parameters(Some(Self::request_params(true)))
                        .parameter(range.clone())
                        .parameter(if_none_match.clone())
                        .securities(Some(self.submit_security())),
                    answers,
                );
            }
        }
    }

    fn admin(&mut self) {
        let admin = || vec![SecurityRequirement::new("bearer", Vec::<String>::new())];
        let needs_admin = || {
            vec![
                unauthorized(", or none: this needs a token with the admin scope"),
                error(403, "The token does not have the admin scope."),
            ]
        };
        let mut answers = vec![
            Answer::new(200, "The build was cancelled: its status.").json(named("BuildResponse")),
            bad_key_or_params(""),
            not_found(),
            error(409, "The build has ended: only queued or running builds, and failed ones that will be retried, can be cancelled."),
            error(408, "The request body did not arrive within `api.body_timeout`."),
            error(413, format!("The request body is larger than {} bytes.", super::MAX_BODY)),
            unavailable("The database is unavailable"),
        ];
        answers.extend(needs_admin());
        self.op(
            HttpMethod::Post,
            "/api/build/{key}/cancel",
            OperationBuilder::new()
                .operation_id(Some("cancelBuild"))
                .tag("admin")
                .summary(Some(
                    "Cancel a queued or running build (the worker stops its container)",
                ))
                .description(Some("A body, if any, is ignored."))
                .parameter(key_param())
                .securities(Some(admin())),
            answers,
        );
        let mut answers = vec![
            Answer::new(202, "The check is queued: the build's status, with `reproduction.status` `queued`.").json(named("BuildResponse")),
            bad_key_or_params(""),
            not_found(),
            error(409, "The build has not succeeded, or its check is already queued or running, or it changed meanwhile."),
            error(408, "The request body did not arrive within `api.body_timeout`."),
            error(413, format!("The request body is larger than {} bytes.", super::MAX_BODY)),
            unavailable("The database is unavailable"),
        ];
        answers.extend(needs_admin());
        self.op(
            HttpMethod::Post,
            "/api/build/{key}/reproduce",
            OperationBuilder::new()
                .operation_id(Some("reproduceBuild"))
                .tag("admin")
                .summary(Some(
                    "Ask for a reproducibility check: another worker builds the request again and compares the bytes",
                ))
                .description(Some("Whatever `janitor.reproduce` says. The result is the build's `reproduction` (and a `reproduced` event in its history). A body, if any, is ignored."))
                .parameter(key_param())
                .securities(Some(admin())),
            answers,
        );
        let mut answers = vec![
            Answer::new(
                200,
                "Running builds, then queued ones in the order workers take them.",
            )
            .json(named("QueueResponse")),
            error(400, "`limit` is out of range, or a parameter is unknown."),
            unavailable("The database is unavailable"),
        ];
        answers.extend(needs_admin());
        self.op(
            HttpMethod::Get,
            "/api/admin/queue",
            OperationBuilder::new()
                .operation_id(Some("getAdminQueue"))
                .tag("admin")
                .summary(Some("Running and queued builds"))
                .parameter(limit_param(
                    super::admin::LIST_LIMIT,
                    &format!(
                        "Builds listed at most, 1 to {} (the default)",
                        super::admin::LIST_LIMIT
                    ),
                ))
                .securities(Some(admin())),
            answers,
        );
        let mut answers = vec![
            Answer::new(
                200,
                "The workers that hold builds now, each with its builds, steps and lease ends.",
            )
            .json(named("WorkersResponse")),
            unavailable("The database is unavailable"),
        ];
        answers.extend(needs_admin());
        self.op(
            HttpMethod::Get,
            "/api/admin/workers",
            OperationBuilder::new()
                .operation_id(Some("getAdminWorkers"))
                .tag("admin")
                .summary(Some("Workers holding builds"))
                .description(Some("Query parameters are ignored."))
                .securities(Some(admin())),
            answers,
        );
    }

    fn meta(&mut self) {
        self.op(
            HttpMethod::Get,
            "/api/openapi.json",
            OperationBuilder::new()
                .operation_id(Some("getOpenApi"))
                .tag("meta")
                .summary(Some("This document"))
                .securities(Some(self.public_security())),
            vec![
                Answer::new(200, "The OpenAPI 3.1 document of this server's API.")
                    .json(ObjectBuilder::new().schema_type(Type::Object)),
            ],
        );
    }

    /// `GET /metrics` (api/metrics.rs): the process's metrics for Prometheus.
    fn metrics(&mut self) {
        self.op(
            HttpMethod::Get,
            "/metrics",
            OperationBuilder::new()
                .operation_id(Some("getMetrics"))
                .tag("meta")
                .summary(Some("Metrics in the OpenMetrics text format, for Prometheus"))
                .securities(Some(self.read_security())),
            vec![
                Answer::new(200, "The metrics (the queue's figures are left out when the database does not answer within 2 s).")
                    .content(METRICS_CONTENT_TYPE, string()),
                self.read_401(),
            ],
        );
    }

    /// The web pages and their assets.
    fn web(&mut self) {
        let html = |what: &str| {
            Answer::new(200, what)
                .content("text/html; charset=utf-8", string())
                .header(
                    "Content-Security-Policy",
                    string(),
                    "Scripts, styles and requests from this origin only; no framing",
                    true,
                )
                .header("ETag", string(), "A hash of the page", true)
        };
        let not_modified = || Answer::new(304, "The client's copy (`If-None-Match`) is current.");
        for (path, id, summary) in [
            ("/", "getDownloadPage", "The download page"),
            ("/recent", "getRecentPage", "Recent builds, live"),
        ] {
            self.op(
                HttpMethod::Get,
                path,
                OperationBuilder::new()
                    .operation_id(Some(id))
                    .tag("web")
                    .summary(Some(summary))
                    .description(Some("An HTML page; its scripts read the JSON API. Query parameters are read by the page's script, not the server."))
                    .securities(Some(self.read_security())),
                vec![html("The page."), not_modified(), self.read_401()],
            );
        }
        for (path, id, summary) in [
            (
                "/build/{key}",
                "getBuildPage",
                "A build's page: live progress, then the download",
            ),
            (
                "/build/{key}/history",
                "getBuildHistoryPage",
                "A build's history page",
            ),
        ] {
            self.op(
                HttpMethod::Get,
                path,
                OperationBuilder::new()
                    .operation_id(Some(id))
                    .tag("web")
                    .summary(Some(summary))
                    .description(Some("An HTML page for any well-formed key (the page says when no build has it)."))
                    .parameter(key_param())
                    .securities(Some(self.read_security())),
                vec![
                    html("The page."),
                    not_modified(),
                    bad_key_or_params(""),
                    self.read_401(),
                ],
            );
        }
        self.op(
            HttpMethod::Get,
            "/assets/{name}",
            OperationBuilder::new()
                .operation_id(Some("getAsset"))
                .tag("web")
                .summary(Some("A script or the stylesheet of the pages"))
                .parameter(
                    Parameter::builder()
                        .name("name")
                        .parameter_in(ParameterIn::Path)
                        .required(Required::True)
                        .schema(Some(string().enum_values(Some(super::web::ASSETS))))
                        .description(Some("The file's name"))
                        .build(),
                )
                .securities(Some(self.read_security())),
            vec![
                Answer::new(
                    200,
                    "The file (`text/javascript`, `text/css` or `image/svg+xml`).",
                )
                .content("text/javascript; charset=utf-8", string())
                .content("text/css; charset=utf-8", string())
                .content("image/svg+xml", string())
                .header("ETag", string(), "A hash of the file", true),
                not_modified(),
                self.read_401(),
                error(404, "No such asset."),
            ],
        );
    }

    fn finish(self) -> Value {
        let mut schemas: Vec<(String, RefOr<Schema>)> = Vec::new();
        fn add<T: ToSchema>(schemas: &mut Vec<(String, RefOr<Schema>)>) {
            schemas.push((T::name().into_owned(), T::schema()));
            T::schemas(schemas);
        }
        add::<wire::ErrorBody>(&mut schemas);
        add::<wire::BuildSubmission>(&mut schemas);
        add::<wire::Build>(&mut schemas);
        add::<wire::HistoryPage>(&mut schemas);
        add::<wire::OutputPage>(&mut schemas);
        add::<wire::FeedPage>(&mut schemas);
        add::<wire::Package>(&mut schemas);
        add::<wire::QueueList>(&mut schemas);
        add::<wire::WorkerList>(&mut schemas);
        add::<wire::StateData>(&mut schemas);
        add::<wire::StepData>(&mut schemas);
        add::<wire::LogData>(&mut schemas);
        add::<wire::ResultData>(&mut schemas);
        add::<wire::Resolution>(&mut schemas);
        add::<wire::ServerOptions>(&mut schemas);
        for (name, result, description) in [
            (
                "BuildResponse",
                schema_ref::<wire::Build>(),
                "A build's status.",
            ),
            (
                "HistoryResponse",
                schema_ref::<wire::HistoryPage>(),
                "A page of a build's history.",
            ),
            (
                "OutputResponse",
                schema_ref::<wire::OutputPage>(),
                "A page of a build's output.",
            ),
            (
                "FeedResponse",
                schema_ref::<wire::FeedPage>(),
                "A page of the global feed.",
            ),
            (
                "PackagesResponse",
                ArrayBuilder::new()
                    .items(schema_ref::<wire::Package>())
                    .into(),
                "The plugin catalog.",
            ),
            (
                "ResolutionResponse",
                schema_ref::<wire::Resolution>(),
                "A resolved request.",
            ),
            (
                "BuildsResponse",
                ArrayBuilder::new()
                    .items(schema_ref::<wire::Build>())
                    .into(),
                "Builds.",
            ),
            (
                "OptionsResponse",
                schema_ref::<wire::ServerOptions>(),
                "The choices a build request has.",
            ),
            (
                "QueueResponse",
                schema_ref::<wire::QueueList>(),
                "The queue.",
            ),
            (
                "WorkersResponse",
                schema_ref::<wire::WorkerList>(),
                "The workers.",
            ),
        ] {
            schemas.push((name.to_owned(), envelope(result, description).into()));
        }
        let components = ComponentsBuilder::new()
            .schemas_from_iter(schemas)
            .security_scheme(
                "bearer",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(
                            "An API token (`access.tokens`), `Authorization: Bearer <secret>`",
                        ))
                        .build(),
                ),
            )
            .build();
        let info = InfoBuilder::new()
            .title("caddy-build-server")
            .version(env!("CARGO_PKG_VERSION"))
            .description(Some(
                "Builds custom Caddy binaries on request and serves them, also through the caddyserver.com-compatible `/api/download`. Every successful JSON answer is `{\"result\": ...}`; every error (4xx, 5xx, on every route, unknown paths and methods included) is `ErrorBody`; every answer carries `x-request-id`. A method a path does not have is a 405 with `Allow`; an unknown path, a 404.",
            ))
            .build();
        let tags = ["builds", "downloads", "admin", "health", "meta"].map(Tag::new);
        let doc = OpenApiBuilder::new()
            .info(info)
            .paths(self.paths)
            .components(Some(components))
            .tags(Some(tags))
            .build();
        let mut doc = serde_json::to_value(doc).expect("the OpenAPI document is JSON");
        // utoipa 5 writes a link's `operationId` as `operation_id`.
        let links = doc
            .get_mut("paths")
            .and_then(Value::as_object_mut)
            .into_iter()
            .flat_map(|paths| paths.values_mut())
            .filter_map(Value::as_object_mut)
            .flat_map(|item| item.values_mut())
            .filter_map(|op| op.get_mut("responses").and_then(Value::as_object_mut))
            .flat_map(|responses| responses.values_mut())
            .filter_map(|resp| resp.get_mut("links").and_then(Value::as_object_mut))
            .flat_map(|links| links.values_mut())
            .filter_map(Value::as_object_mut);
        for link in links {
            if let Some(id) = link.remove("operation_id") {
                link.insert("operationId".to_owned(), id);
            }
        }
        refine_submission(&mut doc);
        for (path, method, status, header) in self.required_headers {
            if let Some(h) = doc
                .pointer_mut(&format!(
                    "/paths/{}/{method}/responses/{status}/headers/{header}",
                    path.replace('~', "~0").replace('/', "~1")
                ))
                .and_then(Value::as_object_mut)
            {
                h.insert("required".to_owned(), Value::Bool(true));
            }
        }
        doc
    }
}

/// The server's limits on a JSON build request (cbs_domain's), which the wire type leaves
/// to the server: the platforms, the number of plugins and replacements, the lengths of
/// module paths and versions.
fn refine_submission(doc: &mut Value) {
    use cbs_domain::module::{MAX_PATH_LEN, MAX_VERSION_LEN};
    let schemas = &mut doc["components"]["schemas"];
    let (oses, arches) = platform_names();
    let limits = [
        ("BuildSubmission", "os", json!({"enum": oses})),
        ("BuildSubmission", "arch", json!({"enum": arches})),
        (
            "BuildSubmission",
            "caddy_version",
            json!({"maxLength": MAX_VERSION_LEN}),
        ),
        (
            "BuildSubmission",
            "plugins",
            json!({"maxItems": cbs_domain::MAX_PLUGINS}),
        ),
        (
            "BuildSubmission",
            "replacements",
            json!({"maxItems": cbs_domain::MAX_PLUGINS}),
        ),
        (
            "PluginSubmission",
            "module",
            json!({"maxLength": MAX_PATH_LEN}),
        ),
        (
            "PluginSubmission",
            "version",
            json!({"maxLength": MAX_VERSION_LEN}),
        ),
        (
            "ReplacementSubmission",
            "old",
            json!({"maxLength": MAX_PATH_LEN}),
        ),
        (
            "ReplacementSubmission",
            "new",
            json!({"maxLength": MAX_PATH_LEN}),
        ),
        (
            "ReplacementSubmission",
            "version",
            json!({"maxLength": MAX_VERSION_LEN}),
        ),
    ];
    for (schema, property, limit) in limits {
        if let (Some(p), Value::Object(limit)) = (
            schemas[schema]["properties"]
                .get_mut(property)
                .and_then(Value::as_object_mut),
            limit,
        ) {
            p.extend(limit);
        }
    }
    if let Some(arm) = schemas["ArmValue"]["oneOf"].as_array_mut() {
        for variant in arm {
            match variant["type"].as_str() {
                Some("integer") => variant["enum"] = json!([5, 6, 7]),
                Some("string") => variant["enum"] = json!(["5", "6", "7", ""]),
                _ => {}
            }
        }
    }
}

/// The GOOS and the GOARCH values of the platforms the server builds for.
fn platform_names() -> (Vec<&'static str>, Vec<&'static str>) {
    let platforms = cbs_domain::platform::PLATFORMS;
    let oses: std::collections::BTreeSet<&str> = platforms.iter().map(|(o, _)| *o).collect();
    let arches: std::collections::BTreeSet<&str> = platforms.iter().map(|(_, a)| *a).collect();
    (oses.into_iter().collect(), arches.into_iter().collect())
}

fn method_name(m: &HttpMethod) -> &'static str {
    match m {
        HttpMethod::Get => "get",
        HttpMethod::Post => "post",
        HttpMethod::Put => "put",
        HttpMethod::Delete => "delete",
        HttpMethod::Options => "options",
        HttpMethod::Head => "head",
        HttpMethod::Patch => "patch",
        HttpMethod::Trace => "trace",
    }
}

/// The in-toto Statement (cbs_signing::provenance): its outer shape; the SLSA predicate is
/// described by its own specification.
fn provenance_schema() -> Object {
    let digest = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("sha256", string().pattern(Some("^[0-9a-f]{64}$")))
        .required("sha256");
    let subject = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("name", string())
        .required("name")
        .property("digest", digest)
        .required("digest");
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some("An in-toto Statement v1 whose subject is the binary, with a SLSA provenance v1 predicate (`buildDefinition`: the request, every linked module with its go.sum hash; `runDetails`: builder image, worker, times)."))
        .property(
            "_type",
            string().enum_values(Some([cbs_signing::provenance::STATEMENT_TYPE])),
        )
        .required("_type")
        .property(
            "subject",
            ArrayBuilder::new().items(subject).min_items(Some(1)).max_items(Some(1)),
        )
        .required("subject")
        .property(
            "predicateType",
            string().enum_values(Some([cbs_signing::provenance::PREDICATE_TYPE])),
        )
        .required("predicateType")
        .property(
            "predicate",
            ObjectBuilder::new()
                .schema_type(Type::Object)
                .property("buildDefinition", ObjectBuilder::new().schema_type(Type::Object))
                .required("buildDefinition")
                .property("runDetails", ObjectBuilder::new().schema_type(Type::Object))
                .required("runDetails"),
        )
        .required("predicate")
        .build()
}

/// One message of the event stream (OpenAPI 3.1 has no `itemSchema`, so a text/event-stream
/// schema describes one event): `event` names it, `data` is JSON of the event's data type,
/// `id` is `<seq>` or `<seq>.<i>`.
fn stream_event_schema() -> RefOr<Schema> {
    let mut events = OneOfBuilder::new().description(Some(
        "One event of the stream: `{\"event\", \"data\", \"id\"}` as an SSE client reads it.",
    ));
    for (name, data) in [
        ("state", wire::StateData::name()),
        ("step", wire::StepData::name()),
        ("log", wire::LogData::name()),
        ("result", wire::ResultData::name()),
    ] {
        let mut content_schema = Extensions::default();
        content_schema.insert(
            "contentSchema".to_owned(),
            serde_json::to_value(Ref::from_schema_name(data)).expect("a reference is JSON"),
        );
        events = events.item(
            ObjectBuilder::new()
                .schema_type(Type::Object)
                .property("event", string().enum_values(Some([name])))
                .required("event")
                .property(
                    "data",
                    string()
                        .content_media_type("application/json")
                        .extensions(Some(content_schema)),
                )
                .required("data")
                .property(
                    "id",
                    string().pattern(Some("^[0-9]{1,10}(\\.[0-9]{1,20}){0,2}$")),
                )
                .required("id"),
        );
    }
    events.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r);
                }
                m.values().for_each(|v| refs(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    /// An OpenAPI 3.1 document whose every reference names a component, and whose every
    /// answer documents `x-request-id` as required.
    #[test]
    fn the_document_holds_together() {
        let doc = document(&Config::default());
        assert_eq!(doc["openapi"], "3.1.0");
        let mut all = Vec::new();
        refs(&doc, &mut all);
        assert!(!all.is_empty());
        for r in all {
            let name = r
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("{r} is not a component schema"));
            assert!(
                doc["components"]["schemas"].get(name).is_some(),
                "{r} names no component"
            );
        }
        let mut operations = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                operations += 1;
                assert!(op["operationId"].is_string(), "{method} {path}");
                for (status, resp) in op["responses"].as_object().unwrap() {
                    if status == "431" {
                        continue;
                    }
                    assert_eq!(
                        resp["headers"]["x-request-id"]["required"], true,
                        "{method} {path} {status}"
                    );
                }
            }
        }
        assert!(operations > 20);
        // The server's limits are in the request's schema.
        let os = &doc["components"]["schemas"]["BuildSubmission"]["properties"]["os"];
        assert!(os["enum"].as_array().unwrap().contains(&json!("linux")));
    }

    /// Who needs a token follows the access mode: in public mode a token is optional
    /// everywhere but the admin routes; in token mode submitting needs one, and reading too
    /// without `public_reads`.
    #[test]
    fn security_follows_the_access_mode() {
        let security =
            |doc: &Value, path: &str, method: &str| doc["paths"][path][method]["security"].clone();
        let public = document(&Config::default());
        let optional = json!([{}, {"bearer": []}]);
        assert_eq!(security(&public, "/api/build", "post"), optional);
        assert_eq!(security(&public, "/api/build/{key}", "get"), optional);
        assert_eq!(
            security(&public, "/api/admin/queue", "get"),
            json!([{"bearer": []}])
        );
        assert_eq!(security(&public, "/healthz", "get"), json!([{}]));
        let mut config = Config::default();
        config.access.mode = AccessMode::Token;
        config.access.public_reads = false;
        let token = document(&config);
        assert_eq!(
            security(&token, "/api/build", "post"),
            json!([{"bearer": []}])
        );
        assert_eq!(
            security(&token, "/api/build/{key}", "get"),
            json!([{"bearer": []}])
        );
        assert_eq!(security(&token, "/api/public-key", "get"), json!([{}]));
    }
}
