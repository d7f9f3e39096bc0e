//! Config errors: every problem in a file, each with its field path, line and a fix-it hint.

use std::fmt;

use serde::Serialize;

/// All problems found in one config source. Never empty.
///
/// Display prints one block per error:
///
/// ```text
/// bad.toml:14: clusters[1].endpoints[0]: invalid address "10.0.0.1": missing port
///   hint: write endpoints as "IP:PORT", e.g. "127.0.0.1:8080"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LoadError {
    /// Where the text came from: the file path, or a name such as `<embedded default config>`.
    pub origin: String,
    /// The problems, in file order.
    pub errors: Vec<ConfigError>,
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfigError {
    /// The field path, e.g. `clusters[1].endpoints[0]`; empty for problems with the whole file
    /// (unreadable file, TOML syntax error).
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub hint: Option<String>,
    /// 1-based line of the offending key or value, when known.
    pub line: Option<usize>,
    /// 1-based column (in characters), set for TOML syntax errors.
    pub column: Option<usize>,
}

impl ConfigError {
    /// `file:line:column: path: message` followed by an indented hint line.
    fn write_block(&self, origin: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(origin)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        f.write_str(": ")?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

impl fmt::Display for ConfigError {
    /// `line 14: clusters[1].endpoints[0]: message` plus the hint line (no origin).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let origin = match (self.line, self.column) {
            (Some(line), Some(column)) => format!("line {line}, column {column}"),
            (Some(line), None) => format!("line {line}"),
            (None, _) => String::from("config"),
        };
        let without_position = Self {
            line: None,
            column: None,
            ..self.clone()
        };
        without_position.write_block(&origin, f)
    }
}

impl std::error::Error for ConfigError {}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, error) in self.errors.iter().enumerate() {
            if index > 0 {
                f.write_str("\n")?;
            }
            error.write_block(&self.origin, f)?;
        }
        if self.errors.is_empty() {
            write!(f, "{}: invalid config", self.origin)?;
        }
        Ok(())
    }
}

impl std::error::Error for LoadError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(path: &str, line: Option<usize>, column: Option<usize>) -> ConfigError {
        ConfigError {
            path: path.to_owned(),
            message: "invalid address \"10.0.0.1\": missing port".to_owned(),
            hint: Some("write endpoints as \"IP:PORT\", e.g. \"127.0.0.1:8080\"".to_owned()),
            line,
            column,
        }
    }

    #[test]
    fn load_error_prints_one_block_per_error() {
        let err = LoadError {
            origin: "bad.toml".to_owned(),
            errors: vec![
                error("clusters[1].endpoints[0]", Some(14), None),
                ConfigError {
                    hint: None,
                    ..error("", Some(3), Some(7))
                },
                error("admin", None, None),
            ],
        };
        assert_eq!(
            err.to_string(),
            "bad.toml:14: clusters[1].endpoints[0]: invalid address \"10.0.0.1\": missing port\n  \
             hint: write endpoints as \"IP:PORT\", e.g. \"127.0.0.1:8080\"\n\
             bad.toml:3:7: invalid address \"10.0.0.1\": missing port\n\
             bad.toml: admin: invalid address \"10.0.0.1\": missing port\n  \
             hint: write endpoints as \"IP:PORT\", e.g. \"127.0.0.1:8080\""
        );
    }

    #[test]
    fn config_error_display_has_no_origin() {
        assert_eq!(
            error("admin.address", Some(2), None).to_string(),
            "line 2: admin.address: invalid address \"10.0.0.1\": missing port\n  \
             hint: write endpoints as \"IP:PORT\", e.g. \"127.0.0.1:8080\""
        );
    }
}
