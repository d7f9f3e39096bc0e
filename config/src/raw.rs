//! The file model: serde structs that mirror the TOML file, field for field. They never leave
//! this crate; `TryFrom<raw::Config> for Config` (in `validate`) turns them into the public types.
//!
//! Every field is optional here (required fields are `Option`, checked in `validate`), and
//! integers are `i64` (TOML's integer type; ranges are checked in `validate`), so a table with
//! some fields removed still deserializes. The loader relies on that: it deserializes each field
//! on its own first, reports the bad ones, and drops them before deserializing the table.
//!
//! The accepted field names come from serde itself ([`fields`]), so the loader's unknown-field
//! check, the reference-doc test and `deny_unknown_fields` can never disagree.

use serde::Deserialize;
use serde::de::{self, DeserializeOwned, Visitor};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    pub version: Option<i64>,
    pub admin: Option<Admin>,
    pub runtime: Option<Runtime>,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub clusters: Vec<Cluster>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Admin {
    pub address: Option<String>,
    pub unix_socket: Option<String>,
    pub danger_allow_non_loopback: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Runtime {
    pub cores: Option<i64>,
    pub pin: Option<bool>,
    pub drain_timeout: Option<Duration>,
    pub ring_entries: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Listener {
    pub name: Option<String>,
    pub address: Option<String>,
    pub protocol: Option<String>,
    pub max_connections: Option<i64>,
    pub idle_timeout: Option<Duration>,
    pub backlog: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Route {
    pub name: Option<String>,
    pub listener: Option<String>,
    pub cluster: Option<String>,
    pub weighted_clusters: Option<Vec<WeightedCluster>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WeightedCluster {
    pub cluster: Option<String>,
    pub weight: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Cluster {
    pub name: Option<String>,
    pub endpoints: Option<Vec<String>>,
    pub connect_timeout: Option<Duration>,
    pub balance: Option<String>,
}

/// A duration as written. Numbers are accepted here so `validate` can reject them with a hint
/// that shows the string form, instead of a bare "expected a string".
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Duration {
    Text(String),
    Integer(i64),
    Float(f64),
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl Visitor<'_> for DurationVisitor {
            type Value = Duration;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a duration string such as \"30s\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                Ok(Duration::Text(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
                Ok(Duration::Integer(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
                Ok(Duration::Integer(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
                Ok(Duration::Float(v))
            }
        }
        deserializer.deserialize_any(DurationVisitor)
    }
}

/// The field names serde accepts for `T` (a struct deriving `Deserialize`), in declaration order.
///
/// Works by handing `T::deserialize` a deserializer that records the field list serde passes to
/// `deserialize_struct` and then fails.
pub(crate) fn fields<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut out: &'static [&'static str] = &[];
    // The probe always fails by design; only the recorded field list matters.
    let _ = T::deserialize(FieldProbe(&mut out));
    out
}

struct FieldProbe<'a>(&'a mut &'static [&'static str]);

impl<'de> de::Deserializer<'de> for FieldProbe<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("field probe: not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("field probe: done"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

/// A table of the file, for error messages and the reference-doc test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Section {
    Top,
    Admin,
    Runtime,
    Listeners,
    Routes,
    WeightedClusters,
    Clusters,
}

impl Section {
    pub(crate) const ALL: [Section; 7] = [
        Section::Top,
        Section::Admin,
        Section::Runtime,
        Section::Listeners,
        Section::Routes,
        Section::WeightedClusters,
        Section::Clusters,
    ];

    /// The accepted field names.
    pub(crate) fn fields(self) -> &'static [&'static str] {
        match self {
            Section::Top => fields::<Config>(),
            Section::Admin => fields::<Admin>(),
            Section::Runtime => fields::<Runtime>(),
            Section::Listeners => fields::<Listener>(),
            Section::Routes => fields::<Route>(),
            Section::WeightedClusters => fields::<WeightedCluster>(),
            Section::Clusters => fields::<Cluster>(),
        }
    }

    /// How the section is written in the file (and titled in the reference).
    pub(crate) fn title(self) -> &'static str {
        match self {
            Section::Top => "the top level",
            Section::Admin => "[admin]",
            Section::Runtime => "[runtime]",
            Section::Listeners => "[[listeners]]",
            Section::Routes => "[[routes]]",
            Section::WeightedClusters => "weighted_clusters entries",
            Section::Clusters => "[[clusters]]",
        }
    }

    /// A valid `field = value` line for `field`, shown in hints when a value has the wrong type.
    pub(crate) fn example(self, field: &str) -> Option<&'static str> {
        Some(match (self, field) {
            (Section::Top, "version") => "version = 1",
            (Section::Top, "admin") => {
                "[admin] followed by its fields, e.g. address = \"127.0.0.1:15000\""
            }
            (Section::Top, "runtime") => "[runtime] followed by its fields, e.g. cores = 2",
            (Section::Top, "listeners") => {
                "one [[listeners]] table per listener (double brackets), e.g. [[listeners]] name = \"tcp-in\" ..."
            }
            (Section::Top, "routes") => {
                "one [[routes]] table per route (double brackets), e.g. [[routes]] name = \"default\" ..."
            }
            (Section::Top, "clusters") => {
                "one [[clusters]] table per cluster (double brackets), e.g. [[clusters]] name = \"echo\" ..."
            }
            (Section::Admin, "address") => "address = \"127.0.0.1:15000\"",
            (Section::Admin, "unix_socket") => "unix_socket = \"/run/meshgate/admin.sock\"",
            (Section::Admin, "danger_allow_non_loopback") => "danger_allow_non_loopback = false",
            (Section::Runtime, "cores") => "cores = 2",
            (Section::Runtime, "pin") => "pin = true",
            (Section::Runtime, "drain_timeout") => "drain_timeout = \"30s\"",
            (Section::Runtime, "ring_entries") => "ring_entries = 1024",
            (Section::Listeners, "name") => "name = \"tcp-in\"",
            (Section::Listeners, "address") => "address = \"127.0.0.1:15001\"",
            (Section::Listeners, "protocol") => "protocol = \"tcp\"",
            (Section::Listeners, "max_connections") => "max_connections = 100000",
            (Section::Listeners, "idle_timeout") => "idle_timeout = \"1h\"",
            (Section::Listeners, "backlog") => "backlog = 1024",
            (Section::Routes, "name") => "name = \"default\"",
            (Section::Routes, "listener") => "listener = \"tcp-in\"",
            (Section::Routes, "cluster") => "cluster = \"echo\"",
            (Section::Routes, "weighted_clusters") => {
                "weighted_clusters = [{ cluster = \"stable\", weight = 98 }, { cluster = \"canary\", weight = 2 }]"
            }
            (Section::WeightedClusters, "cluster") => "cluster = \"stable\"",
            (Section::WeightedClusters, "weight") => "weight = 98",
            (Section::Clusters, "name") => "name = \"echo\"",
            (Section::Clusters, "endpoints") => "endpoints = [\"127.0.0.1:15002\", \"[::1]:8080\"]",
            (Section::Clusters, "connect_timeout") => "connect_timeout = \"5s\"",
            (Section::Clusters, "balance") => "balance = \"round_robin\"",
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_read_from_serde() {
        assert_eq!(
            fields::<Cluster>(),
            ["name", "endpoints", "connect_timeout", "balance"]
        );
        assert_eq!(
            fields::<Config>(),
            [
                "version",
                "admin",
                "runtime",
                "listeners",
                "routes",
                "clusters"
            ]
        );
    }

    /// Each leaf field's example is valid for its struct, so type-error hints never lie.
    #[test]
    fn every_leaf_field_has_a_valid_example() {
        fn check<T: DeserializeOwned>(section: Section) {
            for field in section.fields() {
                let example = section
                    .example(field)
                    .unwrap_or_else(|| panic!("no example for {}.{field}", section.title()));
                let parsed: Result<T, _> = toml::from_str(example);
                assert!(
                    parsed.is_ok(),
                    "example for {}.{field} does not parse: {example}",
                    section.title()
                );
            }
        }
        check::<Admin>(Section::Admin);
        check::<Runtime>(Section::Runtime);
        check::<Listener>(Section::Listeners);
        check::<Route>(Section::Routes);
        check::<WeightedCluster>(Section::WeightedClusters);
        check::<Cluster>(Section::Clusters);
        for field in Section::Top.fields() {
            assert!(
                Section::Top.example(field).is_some(),
                "no example for {field}"
            );
        }
    }
}
