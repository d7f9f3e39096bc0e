//! From text to [`Config`]: TOML syntax, then the file's structure field by field, then
//! `validate`. Collects every error it can find instead of stopping at the first.
//!
//! serde stops at the first error, so the text is parsed into a `toml::Table` and each section,
//! each array element and each field is deserialized on its own: a field with the wrong type or
//! an unknown name is reported and dropped, and the rest of its table is still validated. Line
//! numbers come from a second, span-keeping parse (`toml_edit::ImDocument`), looked up by path.

use std::fmt;
use std::ops::Range;

use toml::Value;

use crate::error::{ConfigError, LoadError};
use crate::raw::{self, Section};
use crate::types::Config;
use crate::validate::{Context, validate};

pub(crate) fn parse(text: &str, origin: &str) -> Result<Config, LoadError> {
    parse_in(text, origin, &Context::default())
}

/// [`parse`] with the directory relative file paths resolve against, and the clock that
/// certificate dates are checked against.
pub(crate) fn parse_in(text: &str, origin: &str, context: &Context) -> Result<Config, LoadError> {
    let table = match text.parse::<toml::Table>() {
        Ok(table) => table,
        Err(err) => {
            return Err(LoadError {
                origin: origin.to_owned(),
                errors: vec![syntax_error(text, &err)],
            });
        }
    };
    let spans = Spans::new(text);
    let mut loader = Loader {
        spans: &spans,
        errors: Vec::new(),
        dropped: Vec::new(),
    };
    let raw = loader.config(table);
    let Loader {
        mut errors,
        dropped,
        ..
    } = loader;
    match validate(raw, context) {
        Ok(config) if errors.is_empty() => return Ok(config),
        Ok(_) => {}
        Err(semantic) => {
            // A value already reported as malformed was dropped; don't also call it missing.
            errors.extend(
                semantic
                    .into_iter()
                    .filter(|e| !dropped.iter().any(|p| covers(p, &e.path))),
            );
        }
    }
    for error in &mut errors {
        if error.line.is_none() {
            error.line = spans.line_of(&error.path);
        }
    }
    errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
    Err(LoadError {
        origin: origin.to_owned(),
        errors,
    })
}

/// True if an error at `outer` makes an error at `inner` redundant.
fn covers(outer: &str, inner: &str) -> bool {
    inner
        .strip_prefix(outer)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
}

fn syntax_error(text: &str, err: &toml::de::Error) -> ConfigError {
    let message = err.message().trim_end().replace('\n', "; ");
    let (line, column) = match err.span() {
        Some(span) => {
            let (line, column) = line_column(text, span.start);
            (Some(line), Some(column))
        }
        None => (None, None),
    };
    let hint = if message.contains("duplicate key") {
        "each key and each [table] may appear only once; remove or merge the repeated one \
         (use [[double brackets]] for a list of tables)"
    } else if message.contains("invalid table header") {
        "write tables as [name] and lists of tables as [[name]], on a line of their own"
    } else if message.contains("invalid array") {
        "separate array items with commas and close the array with `]`, e.g. \
         endpoints = [\"127.0.0.1:8080\", \"127.0.0.1:8081\"]"
    } else if message.contains("invalid inline table") {
        "write an inline table on one line, e.g. { cluster = \"stable\", weight = 98 }"
    } else if message.contains("string") {
        "quote strings with double quotes on one line, e.g. address = \"127.0.0.1:15001\""
    } else if message.contains("expected `=`") || message.contains("invalid key") {
        "write each field as key = value, one per line"
    } else {
        "fix the TOML syntax at this position (format: https://toml.io/en/v1.0.0)"
    };
    ConfigError {
        path: String::new(),
        message: format!("TOML syntax error: {message}"),
        hint: Some(hint.to_owned()),
        line,
        column,
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

/// A field path as built by the loader; printed as `listeners[2].address`.
#[derive(Debug, Clone, Default)]
pub(crate) struct FieldPath(Vec<Segment>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

impl FieldPath {
    fn key(&self, key: &str) -> Self {
        let mut path = self.clone();
        path.0.push(Segment::Key(key.to_owned()));
        path
    }

    fn index(&self, index: usize) -> Self {
        let mut path = self.clone();
        path.0.push(Segment::Index(index));
        path
    }

    /// Reads back what `Display` writes. Keys with `.` or `[` in them cannot round-trip, but
    /// such keys only occur as unknown fields, whose line is known when they are reported.
    fn parse(text: &str) -> Self {
        let mut segments = Vec::new();
        for part in text.split('.').filter(|p| !p.is_empty()) {
            let (key, mut indices) = match part.find('[') {
                Some(i) => part.split_at(i),
                None => (part, ""),
            };
            if !key.is_empty() {
                segments.push(Segment::Key(key.to_owned()));
            }
            while let Some(rest) = indices.strip_prefix('[') {
                let Some(end) = rest.find(']') else { break };
                match rest[..end].parse() {
                    Ok(index) => segments.push(Segment::Index(index)),
                    Err(_) => break,
                }
                indices = &rest[end + 1..];
            }
        }
        FieldPath(segments)
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(key) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    let bare = !key.is_empty()
                        && key
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                    if bare {
                        f.write_str(key)?;
                    } else {
                        write!(f, "{key:?}")?;
                    }
                }
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// Byte spans of keys and values in the text, looked up by field path.
struct Spans<'a> {
    text: &'a str,
    doc: Option<toml_edit::ImDocument<&'a str>>,
}

impl<'a> Spans<'a> {
    fn new(text: &'a str) -> Self {
        Spans {
            text,
            doc: toml_edit::ImDocument::parse(text).ok(),
        }
    }

    /// Line of the deepest part of `path` present in the file (a missing field is reported
    /// at its table's header).
    fn line_of(&self, path: &str) -> Option<usize> {
        self.line(&FieldPath::parse(path))
    }

    fn line(&self, path: &FieldPath) -> Option<usize> {
        let doc = self.doc.as_ref()?;
        let mut node = Node::Table(doc.as_table());
        let mut best: Option<Range<usize>> = None;
        for segment in &path.0 {
            let Some((span, next)) = node.child(segment) else {
                break;
            };
            if span.is_some() {
                best = span;
            }
            node = next;
        }
        best.map(|span| line_column(self.text, span.start).0)
    }
}

#[derive(Clone, Copy)]
enum Node<'a> {
    Table(&'a toml_edit::Table),
    Item(&'a toml_edit::Item),
    Value(&'a toml_edit::Value),
}

impl<'a> Node<'a> {
    fn child(self, segment: &Segment) -> Option<(Option<Range<usize>>, Node<'a>)> {
        let value = match self {
            Node::Table(table) => return Node::table_child(table, segment),
            Node::Item(toml_edit::Item::Table(table)) => {
                return Node::table_child(table, segment);
            }
            Node::Item(toml_edit::Item::ArrayOfTables(array)) => {
                let Segment::Index(index) = segment else {
                    return None;
                };
                let table = array.get(*index)?;
                return Some((table.span(), Node::Table(table)));
            }
            Node::Item(toml_edit::Item::Value(value)) | Node::Value(value) => value,
            Node::Item(_) => return None,
        };
        match (value, segment) {
            (toml_edit::Value::InlineTable(table), Segment::Key(key)) => {
                let (key, item) = table.get_key_value(key)?;
                Some((key.span().or_else(|| item.span()), Node::Item(item)))
            }
            (toml_edit::Value::Array(array), Segment::Index(index)) => {
                let value = array.get(*index)?;
                Some((value.span(), Node::Value(value)))
            }
            _ => None,
        }
    }

    fn table_child(
        table: &'a toml_edit::Table,
        segment: &Segment,
    ) -> Option<(Option<Range<usize>>, Node<'a>)> {
        let Segment::Key(key) = segment else {
            return None;
        };
        let (key, item) = table.get_key_value(key)?;
        Some((key.span().or_else(|| item.span()), Node::Item(item)))
    }
}

/// Splits the file into sections and fields, reporting and dropping the malformed ones.
struct Loader<'s> {
    spans: &'s Spans<'s>,
    errors: Vec<ConfigError>,
    /// Paths of the values dropped for having the wrong type.
    dropped: Vec<String>,
}

impl Loader<'_> {
    fn config(&mut self, mut top: toml::Table) -> raw::Config {
        let root = FieldPath::default();
        for (key, section) in [
            ("admin", Section::Admin),
            ("runtime", Section::Runtime),
            ("access_log", Section::AccessLog),
            ("telemetry", Section::Telemetry),
        ] {
            if let Some(Value::Table(table)) = top.get_mut(key) {
                *table = self.clean(std::mem::take(table), section, &root.key(key));
            }
        }
        self.clean_subtable(
            &mut top,
            ("control", Section::Control),
            &root,
            &[
                ("enrollment", Section::ControlEnrollment),
                ("workload_api", Section::ControlWorkloadApi),
            ],
            &[],
        );
        for (key, section) in [
            ("listeners", Section::Listeners),
            ("routes", Section::Routes),
            ("clusters", Section::Clusters),
            ("policies", Section::Policies),
        ] {
            if let Some(Value::Array(items)) = top.get_mut(key) {
                let path = root.key(key);
                for (index, item) in items.iter_mut().enumerate() {
                    let item_path = path.index(index);
                    let mut table = self.element_table(item, section, &item_path);
                    match section {
                        Section::Routes => {
                            self.clean_weighted_clusters(&mut table, &item_path);
                            self.clean_subtable(
                                &mut table,
                                ("match", Section::RouteMatch),
                                &item_path,
                                &[("peer", Section::PeerMatch), ("path", Section::PathMatch)],
                                &[
                                    ("headers", Section::HeaderMatch),
                                    ("query", Section::QueryMatch),
                                ],
                            );
                            for sub in [
                                ("direct_response", Section::DirectResponse),
                                ("redirect", Section::Redirect),
                                ("request_headers", Section::HeaderOps),
                                ("response_headers", Section::HeaderOps),
                                ("retry", Section::RouteRetry),
                            ] {
                                self.clean_subtable(&mut table, sub, &item_path, &[], &[]);
                            }
                        }
                        Section::Listeners => {
                            self.clean_subtable(
                                &mut table,
                                ("tls", Section::ListenerTls),
                                &item_path,
                                &[],
                                &[
                                    ("certificates", Section::Certificates),
                                    ("trust_bundles", Section::TrustBundles),
                                ],
                            );
                            self.clean_subtable(
                                &mut table,
                                ("http", Section::ListenerHttp),
                                &item_path,
                                &[],
                                &[],
                            );
                        }
                        Section::Policies => self.clean_policy_rules(&mut table, &item_path),
                        Section::Clusters => {
                            self.clean_subtable(
                                &mut table,
                                ("tls", Section::ClusterTls),
                                &item_path,
                                &[("verify", Section::Verify), ("identity", Section::Identity)],
                                &[],
                            );
                            for sub in [
                                ("health_check", Section::HealthCheck),
                                ("outlier_detection", Section::OutlierDetection),
                                ("circuit_breakers", Section::CircuitBreakers),
                                ("retry_budget", Section::RetryBudget),
                            ] {
                                self.clean_subtable(&mut table, sub, &item_path, &[], &[]);
                            }
                        }
                        _ => {}
                    }
                    *item = Value::Table(self.clean(table, section, &item_path));
                }
            }
        }
        let cleaned = self.clean(top, Section::Top, &root);
        match Value::Table(cleaned).try_into::<raw::Config>() {
            Ok(config) => config,
            Err(err) => {
                self.internal(&root, &err);
                raw::Config::default()
            }
        }
    }

    /// `[[policies.rules]]`: each rule has the shape of a `[routes.match]`.
    fn clean_policy_rules(&mut self, policy: &mut toml::Table, policy_path: &FieldPath) {
        if let Some(Value::Array(items)) = policy.get_mut("rules") {
            let path = policy_path.key("rules");
            for (index, item) in items.iter_mut().enumerate() {
                let item_path = path.index(index);
                let table = self.element_table(item, Section::PolicyRules, &item_path);
                *item = Value::Table(self.clean_nested(
                    table,
                    Section::PolicyRules,
                    &item_path,
                    &[("peer", Section::PeerMatch), ("path", Section::PathMatch)],
                    &[
                        ("headers", Section::HeaderMatch),
                        ("query", Section::QueryMatch),
                    ],
                ));
            }
        }
    }

    fn clean_weighted_clusters(&mut self, route: &mut toml::Table, route_path: &FieldPath) {
        if let Some(Value::Array(items)) = route.get_mut("weighted_clusters") {
            let path = route_path.key("weighted_clusters");
            for (index, item) in items.iter_mut().enumerate() {
                let item_path = path.index(index);
                let table = self.element_table(item, Section::WeightedClusters, &item_path);
                *item = Value::Table(self.clean(table, Section::WeightedClusters, &item_path));
            }
        }
    }

    /// Cleans the nested table `key` of `parent` (and its own nested tables and arrays of
    /// tables) before `parent` itself is cleaned, so a bad field deep down is reported at its
    /// own path and the rest of the table still validates.
    fn clean_subtable(
        &mut self,
        parent: &mut toml::Table,
        (key, section): (&str, Section),
        parent_path: &FieldPath,
        tables: &[(&str, Section)],
        arrays: &[(&str, Section)],
    ) {
        let Some(Value::Table(sub)) = parent.get_mut(key) else {
            return;
        };
        let path = parent_path.key(key);
        *sub = self.clean_nested(std::mem::take(sub), section, &path, tables, arrays);
    }

    /// Cleans `table` (a `section` at `path`) after its nested tables and arrays of tables.
    fn clean_nested(
        &mut self,
        mut table: toml::Table,
        section: Section,
        path: &FieldPath,
        tables: &[(&str, Section)],
        arrays: &[(&str, Section)],
    ) -> toml::Table {
        for (child, child_section) in tables {
            if let Some(Value::Table(sub)) = table.get_mut(*child) {
                *sub = self.clean(std::mem::take(sub), *child_section, &path.key(child));
            }
        }
        for (child, child_section) in arrays {
            if let Some(Value::Array(items)) = table.get_mut(*child) {
                let array_path = path.key(child);
                for (index, item) in items.iter_mut().enumerate() {
                    let item_path = array_path.index(index);
                    let element = self.element_table(item, *child_section, &item_path);
                    *item = Value::Table(self.clean(element, *child_section, &item_path));
                }
            }
        }
        self.clean(table, section, path)
    }

    /// The table of one array element; anything else is reported and replaced by an empty
    /// table, so the indices of the following elements stay right.
    fn element_table(&mut self, item: &Value, section: Section, path: &FieldPath) -> toml::Table {
        if let Value::Table(table) = item {
            return table.clone();
        }
        let hint = match section {
            Section::WeightedClusters => {
                "write each entry as an inline table, e.g. { cluster = \"stable\", weight = 98 }"
                    .to_owned()
            }
            Section::Certificates => "write each entry as an inline table, e.g. { cert = \
                                      \"server.pem\", key = \"server-key.pem\" }"
                .to_owned(),
            Section::TrustBundles => "write each entry as an inline table, e.g. { trust_domain \
                                      = \"example.test\", bundle = \"example.test.pem\" }"
                .to_owned(),
            Section::HeaderMatch => "write each entry as an inline table, e.g. { name = \
                                     \"x-canary\", exact = \"1\" }"
                .to_owned(),
            _ => format!(
                "declare each entry in its own {} table (double brackets) with its fields \
                 on the lines below",
                section.title()
            ),
        };
        self.push(
            path,
            format!("expected a table, found {}", describe(item)),
            hint,
        );
        self.dropped.push(path.to_string());
        toml::Table::new()
    }

    /// Keeps the fields of `table` that `section` knows and that have the right type.
    fn clean(&mut self, table: toml::Table, section: Section, path: &FieldPath) -> toml::Table {
        let fields = section.fields();
        let mut kept = toml::Table::new();
        for (key, value) in table {
            let field_path = path.key(&key);
            if !fields.contains(&key.as_str()) {
                self.unknown_field(section, &field_path, &key);
                continue;
            }
            if let Some(datetime) = find_datetime(&value) {
                self.datetime(section, &field_path, &key, datetime);
                self.dropped.push(field_path.to_string());
                continue;
            }
            if let Err(err) = try_field(section, &key, &value) {
                self.type_error(section, &field_path, &key, &value, &err);
                self.dropped.push(field_path.to_string());
                continue;
            }
            kept.insert(key, value);
        }
        kept
    }

    fn unknown_field(&mut self, section: Section, path: &FieldPath, key: &str) {
        let fields = section.fields();
        let mut hint = String::new();
        if let Some(near) = nearest(key, fields) {
            hint.push_str(&format!("did you mean `{near}`? "));
        } else if let Some(other) = Section::ALL
            .into_iter()
            .find(|other| *other != section && other.fields().contains(&key))
        {
            hint.push_str(&format!(
                "`{key}` is a field of {}, not of {}. ",
                other.title(),
                section.title()
            ));
        }
        let list = fields
            .iter()
            .map(|f| format!("`{f}`"))
            .collect::<Vec<_>>()
            .join(", ");
        hint.push_str(&format!("fields of {}: {list}", section.title()));
        self.push(path, format!("unknown field `{key}`"), hint);
    }

    fn type_error(
        &mut self,
        section: Section,
        path: &FieldPath,
        key: &str,
        value: &Value,
        err: &toml::de::Error,
    ) {
        // Point at the first bad element of an array, if one is bad on its own.
        let (path, found) = match value {
            Value::Array(items) => items
                .iter()
                .enumerate()
                .find(|(_, item)| {
                    try_field(section, key, &Value::Array(vec![(*item).clone()])).is_err()
                })
                .map_or((path.clone(), value), |(index, item)| {
                    (path.index(index), item)
                }),
            _ => (path.clone(), value),
        };
        let expected =
            if section == Section::Top && matches!(key, "listeners" | "routes" | "clusters") {
                Some(format!("an array of tables ([[{key}]])"))
            } else {
                expected(err.message())
            };
        let message = match expected {
            Some(expected) => format!("expected {expected}, found {}", describe(found)),
            None => err.message().trim_end().to_owned(),
        };
        let hint = match section.example(key) {
            Some(example) if example.starts_with(&format!("{key} = ")) => {
                format!("write it like `{example}`")
            }
            Some(example) => example.to_owned(),
            None => "see docs/config-reference.md for the type of this field".to_owned(),
        };
        self.push(&path, message, hint);
    }

    /// No field takes a date-time, but some raw types would accept one as a string.
    fn datetime(&mut self, section: Section, path: &FieldPath, key: &str, datetime: &Value) {
        let example = match section.example(key) {
            Some(example) if example.starts_with(&format!("{key} = ")) => {
                format!("; write it like `{example}`")
            }
            _ => String::new(),
        };
        self.push(
            path,
            format!(
                "date-times are not valid here, found {}",
                describe(datetime)
            ),
            format!("quote the value if it is meant as a string{example}"),
        );
    }

    fn internal(&mut self, path: &FieldPath, err: &toml::de::Error) {
        self.push(
            path,
            format!(
                "internal error reading the config: {}",
                err.message().trim_end()
            ),
            "this is a meshgate bug; please report it with the config file".to_owned(),
        );
    }

    fn push(&mut self, path: &FieldPath, message: String, hint: String) {
        self.errors.push(ConfigError {
            path: path.to_string(),
            message,
            hint: Some(hint),
            line: self.spans.line(path),
            column: None,
        });
    }
}

/// The first date-time in `value`, if any.
fn find_datetime(value: &Value) -> Option<&Value> {
    match value {
        Value::Datetime(_) => Some(value),
        Value::Array(items) => items.iter().find_map(find_datetime),
        Value::Table(table) => table.values().find_map(find_datetime),
        _ => None,
    }
}

/// Deserializes `section`'s struct from a table holding only `key = value`: every raw field is
/// optional, so this fails exactly when `value` has the wrong type for `key`.
fn try_field(section: Section, key: &str, value: &Value) -> Result<(), toml::de::Error> {
    let mut table = toml::Table::new();
    table.insert(key.to_owned(), value.clone());
    let value = Value::Table(table);
    match section {
        Section::Top => value.try_into::<raw::Config>().map(drop),
        Section::Admin => value.try_into::<raw::Admin>().map(drop),
        Section::Runtime => value.try_into::<raw::Runtime>().map(drop),
        Section::Listeners => value.try_into::<raw::Listener>().map(drop),
        Section::Routes => value.try_into::<raw::Route>().map(drop),
        Section::WeightedClusters => value.try_into::<raw::WeightedCluster>().map(drop),
        Section::Clusters => value.try_into::<raw::Cluster>().map(drop),
        Section::ListenerTls => value.try_into::<raw::ListenerTls>().map(drop),
        Section::Certificates => value.try_into::<raw::Certificate>().map(drop),
        Section::TrustBundles => value.try_into::<raw::TrustBundle>().map(drop),
        Section::RouteMatch => value.try_into::<raw::RouteMatch>().map(drop),
        Section::PeerMatch => value.try_into::<raw::PeerMatch>().map(drop),
        Section::ClusterTls => value.try_into::<raw::ClusterTls>().map(drop),
        Section::Verify => value.try_into::<raw::Verify>().map(drop),
        Section::Identity => value.try_into::<raw::Identity>().map(drop),
        Section::HealthCheck => value.try_into::<raw::HealthCheck>().map(drop),
        Section::OutlierDetection => value.try_into::<raw::OutlierDetection>().map(drop),
        Section::ListenerHttp => value.try_into::<raw::ListenerHttp>().map(drop),
        Section::PathMatch => value.try_into::<raw::PathMatch>().map(drop),
        Section::HeaderMatch => value.try_into::<raw::HeaderMatch>().map(drop),
        Section::QueryMatch => value.try_into::<raw::QueryMatch>().map(drop),
        Section::DirectResponse => value.try_into::<raw::DirectResponse>().map(drop),
        Section::Redirect => value.try_into::<raw::Redirect>().map(drop),
        Section::HeaderOps => value.try_into::<raw::HeaderOps>().map(drop),
        Section::AccessLog => value.try_into::<raw::AccessLog>().map(drop),
        Section::Control => value.try_into::<raw::Control>().map(drop),
        Section::ControlEnrollment => value.try_into::<raw::ControlEnrollment>().map(drop),
        Section::Telemetry => value.try_into::<raw::Telemetry>().map(drop),
        Section::RouteRetry => value.try_into::<raw::RouteRetry>().map(drop),
        Section::CircuitBreakers => value.try_into::<raw::CircuitBreakers>().map(drop),
        Section::RetryBudget => value.try_into::<raw::RetryBudget>().map(drop),
        Section::ControlWorkloadApi => value.try_into::<raw::ControlWorkloadApi>().map(drop),
        Section::Policies => value.try_into::<raw::Policy>().map(drop),
        Section::PolicyRules => value.try_into::<raw::RouteMatch>().map(drop),
    }
}

/// The expected type from a serde "invalid type: ..., expected ..." message, in plain words.
fn expected(message: &str) -> Option<String> {
    let expected = message.trim_end().rsplit_once(", expected ")?.1;
    Some(match expected {
        "i64" | "u64" | "i32" | "u32" => "an integer".to_owned(),
        "a boolean" => "a boolean (true or false)".to_owned(),
        "a sequence" => "an array".to_owned(),
        other if other.starts_with("struct ") => "a table".to_owned(),
        other => other.to_owned(),
    })
}

/// A TOML value as named in messages: `string "x"`, `integer 5`, `a table`.
pub(crate) fn describe(value: &Value) -> String {
    match value {
        Value::String(s) => format!("string {s:?}"),
        Value::Integer(i) => format!("integer {i}"),
        Value::Float(x) => format!("float {x}"),
        Value::Boolean(b) => format!("boolean {b}"),
        Value::Datetime(d) => format!("date-time {d}"),
        Value::Array(_) => "an array".to_owned(),
        Value::Table(_) => "a table".to_owned(),
    }
}

/// The candidate closest to `word` by edit distance, if it is close enough to be a typo.
pub(crate) fn nearest<'c>(word: &str, candidates: &[&'c str]) -> Option<&'c str> {
    let word_lower = word.to_ascii_lowercase();
    candidates
        .iter()
        .map(|c| (edit_distance(&word_lower, &c.to_ascii_lowercase()), *c))
        .filter(|(distance, c)| *distance <= (c.len().max(word.len()) / 3).max(1))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, c)| c)
}

/// Levenshtein distance over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_paths_round_trip() {
        for text in [
            "",
            "version",
            "listeners[2].address",
            "routes[0].weighted_clusters[1].weight",
            "clusters[1].endpoints[0]",
        ] {
            let path = FieldPath::parse(text);
            assert_eq!(path.to_string(), text);
        }
    }

    #[test]
    fn covers_only_the_path_and_below() {
        assert!(covers("listeners[0]", "listeners[0]"));
        assert!(covers("listeners[0]", "listeners[0].name"));
        assert!(covers(
            "routes[0].weighted_clusters",
            "routes[0].weighted_clusters[1]"
        ));
        assert!(!covers("listeners[0]", "listeners[01]"));
        assert!(!covers("listeners[1]", "listeners[10].name"));
        assert!(!covers("listeners[0].foo", "listeners[0].name"));
    }

    #[test]
    fn nearest_finds_typos_only() {
        let fields = ["name", "endpoints", "connect_timeout", "balance"];
        assert_eq!(nearest("endpoint", &fields), Some("endpoints"));
        assert_eq!(nearest("Endpoints", &fields), Some("endpoints"));
        assert_eq!(nearest("conect_timeout", &fields), Some("connect_timeout"));
        assert_eq!(nearest("weight", &fields), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn line_column_counts_characters() {
        let text = "a = 1\nbé = \"x\"\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 6), (2, 1));
        assert_eq!(line_column(text, 10), (2, 4));
    }
}
