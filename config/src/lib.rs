//! meshgate-config: the configuration file model and the validated types built from it.
//!
//! Data flow: file text -> [`parse`] (TOML syntax, then each section and each array element is
//! deserialized on its own into the crate-private `raw` structs, so one bad listener does not hide
//! errors elsewhere) -> `TryFrom<raw::Config> for Config` (semantic checks and cross references)
//! -> [`Config`]. Every problem found on the way becomes one [`ConfigError`] with the field path,
//! the line, and a hint that says how to fix it; [`LoadError`] carries all of them.
//!
//! The daemon, `meshgate config validate` and hot reload all call the same [`load`]. There is no
//! runtime in this crate: it only reads text and builds plain data.
//!
//! The file format is documented field by field in `docs/config-reference.md`; unit tests keep
//! that reference and the `raw` structs in step.

mod duration;
mod error;
mod load;
mod raw;
mod types;
mod validate;

use std::path::Path;

pub use duration::{DurationError, format_duration, parse_duration};
pub use error::{ConfigError, LoadError};
pub use types::{
    AdminConfig, Balance, Cluster, Config, Listener, Protocol, Route, RouteAction, RuntimeConfig,
    WeightedCluster,
};

/// The configuration `meshgate run` uses when no `--config` is given (`config/examples/default.toml`).
pub const EMBEDDED_DEFAULT: &str = include_str!("../examples/default.toml");

/// The origin name used in errors about [`EMBEDDED_DEFAULT`].
pub const EMBEDDED_DEFAULT_ORIGIN: &str = "<embedded default config>";

/// Reads and validates the config file at `path`.
///
/// A file that cannot be read is reported as a [`LoadError`] naming the file, like any other
/// config problem.
pub fn load(path: &Path) -> Result<Config, LoadError> {
    let origin = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text, &origin),
        Err(err) => Err(LoadError {
            origin,
            errors: vec![ConfigError {
                path: String::new(),
                message: format!("cannot read config file: {err}"),
                hint: Some(match err.kind() {
                    std::io::ErrorKind::NotFound => {
                        "check the path given to --config; run `meshgate run` without --config to \
                         use the embedded default"
                            .to_owned()
                    }
                    std::io::ErrorKind::PermissionDenied => {
                        "make the file readable by the user meshgate runs as".to_owned()
                    }
                    std::io::ErrorKind::InvalidData => "save the file as UTF-8 text".to_owned(),
                    _ => "check that the path names a readable UTF-8 text file".to_owned(),
                }),
                line: None,
                column: None,
            }],
        }),
    }
}

/// Parses and validates config text. `origin` names the text in errors (usually the file path).
pub fn parse(text: &str, origin: &str) -> Result<Config, LoadError> {
    load::parse(text, origin)
}

/// The validated [`EMBEDDED_DEFAULT`] config.
pub fn embedded_default() -> Config {
    // A constant of this crate, parsed by the unit tests: not input.
    parse(EMBEDDED_DEFAULT, EMBEDDED_DEFAULT_ORIGIN).expect("embedded default config is valid")
}
