//! Where an invalid value sits, and how to name that place to the person who wrote it: a config
//! path with its line number for a file (`xdp-lb.toml:12: services[0].backends[3].address: ...`),
//! or the CLI's own words for a refused change (`service web, backend 10.0.0.1:80: weight: ...`),
//! since a CLI user never wrote `services[0]`.

use std::fmt;

use toml_edit::{ImDocument, Item};

/// The place of one invalid value, structured so that each caller can render it its own way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A field of `[dataplane]`.
    Dataplane { field: &'static str },
    /// A field of `[announce]`.
    Announce { field: &'static str },
    /// The service list as a whole (limits that count across services).
    Services,
    /// A field of `services[index]`; `field` may be dotted (`health_check.interval_ms`).
    Service { index: usize, name: String, field: &'static str },
    /// A field of `services[service].backends[index]`.
    Backend { service: usize, service_name: String, index: usize, address: String, field: &'static str },
}

/// One invalid field: where it is, what is wrong, and (for files) on which line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub location: Location,
    /// Starts with the offending value where there is one, so it reads after any prefix.
    pub message: String,
    /// 1-based line in the file the configuration came from, when it came from a file.
    pub line: Option<usize>,
}

impl FieldError {
    pub fn new(location: Location, message: impl Into<String>) -> FieldError {
        FieldError { location, message: message.into(), line: None }
    }

    /// The path as written in a config file: `services[0].backends[3].address`.
    pub fn path(&self) -> String {
        match &self.location {
            Location::Dataplane { field } => format!("dataplane.{field}"),
            Location::Announce { field } => format!("announce.{field}"),
            Location::Services => "services".into(),
            Location::Service { index, field, .. } => format!("services[{index}].{field}"),
            Location::Backend { service, index, field, .. } => format!("services[{service}].backends[{index}].{field}"),
        }
    }

    /// The error in the CLI's terms: the service and backend by name and the option by its flag,
    /// never a config path the user did not write.
    pub fn render_for_cli(&self) -> String {
        match &self.location {
            // Not settable from the CLI: name the setting in the config file that must change.
            Location::Dataplane { field } => format!("[dataplane] {field} in the config file: {}", self.message),
            Location::Announce { field } => format!("[announce] {field} in the config file: {}", self.message),
            Location::Services => self.message.clone(),
            Location::Service { name, field, .. } => match cli_flag(field) {
                Some(flag) => format!("service {name}: {flag}: {}", self.message),
                None if *field == "name" => format!("service name: {}", self.message),
                // Its message names the service already.
                None if *field == "backends" => self.message.clone(),
                None => format!("service {name}: {field}: {}", self.message),
            },
            Location::Backend { service_name, address, field, .. } => match *field {
                "address" => format!("service {service_name}, backend {address}: {}", self.message),
                _ => format!("service {service_name}, backend {address}: {field}: {}", self.message),
            },
        }
    }
}

/// All errors of one refused change on one line (the CLI prints every error as one line).
pub fn render_for_cli(errors: &[FieldError]) -> String {
    errors.iter().map(FieldError::render_for_cli).collect::<Vec<_>>().join("; ")
}

/// The `xdp-lb service add|update` option that sets a service field.
fn cli_flag(field: &str) -> Option<&'static str> {
    Some(match field {
        "vip" => "--vip",
        "protocol" => "--protocol",
        "mode" => "--mode",
        "scheduler" => "--scheduler",
        "ring_size" => "--ring-size",
        "all_down" => "--all-down",
        "drain_timeout_ms" => "--drain-timeout-ms",
        "passive_checks" => "--passive-checks",
        "health_check.kind" => "--check",
        "health_check.port" => "--check-port",
        "health_check.path" => "--check-path",
        "health_check.expect" => "--check-expect",
        "health_check.interval_ms" => "--check-interval-ms",
        "health_check.timeout_ms" => "--check-timeout-ms",
        "health_check.rise" => "--rise",
        "health_check.fall" => "--fall",
        _ => return None,
    })
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path(), self.message)
    }
}

/// One step of a path through the TOML document.
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

/// Sets each error's line: that of the key it names, or, when that key is not written (a
/// default was used), that of the nearest enclosing table that is.
pub(super) fn locate(errors: &mut [FieldError], text: &str) {
    let Ok(doc) = ImDocument::parse(text) else { return };
    for e in errors {
        e.line = line_of(&doc, text, &e.location);
    }
}

fn line_of(doc: &ImDocument<&str>, text: &str, location: &Location) -> Option<usize> {
    let mut steps = Vec::new();
    let dotted = |field: &'static str, steps: &mut Vec<Step<'static>>| steps.extend(field.split('.').map(Step::Key));
    match location {
        Location::Dataplane { field } => {
            steps.push(Step::Key("dataplane"));
            dotted(field, &mut steps);
        }
        Location::Announce { field } => {
            steps.push(Step::Key("announce"));
            dotted(field, &mut steps);
        }
        Location::Services => steps.push(Step::Key("services")),
        Location::Service { index, field, .. } => {
            steps.extend([Step::Key("services"), Step::Index(*index)]);
            dotted(field, &mut steps);
        }
        Location::Backend { service, index, field, .. } => {
            steps.extend([Step::Key("services"), Step::Index(*service), Step::Key("backends"), Step::Index(*index)]);
            dotted(field, &mut steps);
        }
    }
    let mut item: &Item = doc.as_item();
    let mut span = None;
    for step in steps {
        let (next, here) = match step {
            Step::Key(key) => {
                let Some((key, value)) = item.as_table_like().and_then(|t| t.get_key_value(key)) else { break };
                (value, key.span().or_else(|| value.span()))
            }
            Step::Index(i) => {
                let Some(value) = item.get(i) else { break };
                (value, value.span())
            }
        };
        span = here.or(span);
        item = next;
    }
    span.map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
}
