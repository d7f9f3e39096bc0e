//! Validation of `[control]`: the control plane that `meshgate run` hosts beside the dataplane
//! (the local CA in the state directory and the enrollment server).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use std::path::PathBuf;

use super::{AddressUse, MAX_UNIX_SOCKET_PATH, Validator, is_dns_name};
use crate::raw;
use crate::types::{ControlConfig, ControlEnrollmentConfig, ControlWorkloadApiConfig};

pub(crate) const DEFAULT_ENROLLMENT_ADDRESS: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15012);
pub(crate) const DEFAULT_WORKLOAD_SOCKET: &str = "/run/meshgate/workload.sock";
pub(crate) const DEFAULT_RENEWAL_GRACE: Duration = Duration::from_secs(24 * 3600);

impl Validator {
    pub(super) fn control(&mut self, raw: raw::Control) -> Option<ControlConfig> {
        let trust_domain = match raw.trust_domain {
            None => Some(None),
            Some(text) => self
                .trust_domain("control.trust_domain", Some(text))
                .map(Some),
        };
        let enrollment = match raw.enrollment {
            None => Some(None),
            Some(e) => self.control_enrollment(e).map(Some),
        };
        let workload_api = match raw.workload_api {
            None => Some(None),
            Some(w) => self.control_workload_api(w).map(Some),
        };
        Some(ControlConfig {
            trust_domain: trust_domain?,
            enrollment: enrollment?,
            workload_api: workload_api?,
        })
    }

    fn control_workload_api(
        &mut self,
        raw: raw::ControlWorkloadApi,
    ) -> Option<ControlWorkloadApiConfig> {
        const PATH: &str = "control.workload_api.socket";
        let socket = match raw.socket {
            None => Some(PathBuf::from(DEFAULT_WORKLOAD_SOCKET)),
            Some(text) => {
                let path = PathBuf::from(&text);
                if !path.is_absolute() || text.ends_with('/') {
                    self.error(
                        PATH,
                        format!("socket {text:?} is not an absolute file path"),
                        "e.g. socket = \"/run/meshgate/workload.sock\" (workloads find it through \
                         SPIFFE_ENDPOINT_SOCKET=unix:///run/meshgate/workload.sock)",
                    );
                    None
                } else if text.len() > MAX_UNIX_SOCKET_PATH {
                    self.error(
                        PATH,
                        format!(
                            "socket path is {} bytes; Unix socket paths are limited to \
                             {MAX_UNIX_SOCKET_PATH} bytes",
                            text.len()
                        ),
                        "use a shorter path, e.g. socket = \"/run/meshgate/workload.sock\"",
                    );
                    None
                } else {
                    Some(path)
                }
            }
        };
        let svid_ttl = match raw.svid_ttl {
            None => Some(None),
            Some(value) => self
                .duration(
                    "control.workload_api.svid_ttl",
                    "svid_ttl",
                    Some(value),
                    Duration::from_secs(3600),
                    true,
                )
                .map(Some),
        };
        Some(ControlWorkloadApiConfig {
            socket: socket?,
            svid_ttl: svid_ttl?,
        })
    }

    fn control_enrollment(
        &mut self,
        raw: raw::ControlEnrollment,
    ) -> Option<ControlEnrollmentConfig> {
        let address = match raw.address {
            None => Some(DEFAULT_ENROLLMENT_ADDRESS),
            Some(text) => self.address("control.enrollment.address", &text, AddressUse::Listener),
        };
        let mut dns_ok = true;
        let dns_names = raw.dns_names.unwrap_or_default();
        for (index, name) in dns_names.iter().enumerate() {
            if !is_dns_name(name) && name.parse::<IpAddr>().is_err() {
                self.error(
                    format!("control.enrollment.dns_names[{index}]"),
                    format!("{name:?} is neither a DNS name nor an IP address"),
                    "list the names (or IP addresses) clients use in the server's URL, e.g. \
                     dns_names = [\"ca.example.org\"]; the listen IP is added to the \
                     certificate by itself",
                );
                dns_ok = false;
            }
        }
        let svid_ttl = match raw.svid_ttl {
            None => Some(None),
            Some(value) => self
                .duration(
                    "control.enrollment.svid_ttl",
                    "svid_ttl",
                    Some(value),
                    Duration::from_secs(3600),
                    true,
                )
                .map(Some),
        };
        let renewal_grace = self.duration(
            "control.enrollment.renewal_grace",
            "renewal_grace",
            raw.renewal_grace,
            DEFAULT_RENEWAL_GRACE,
            false,
        );
        Some(ControlEnrollmentConfig {
            address: address?,
            dns_names: dns_ok.then_some(dns_names)?,
            svid_ttl: svid_ttl?,
            renewal_grace: renewal_grace?,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    const BASE: &str = r#"version = 1

[[listeners]]
name = "l"
address = "127.0.0.1:0"
protocol = "tcp"

[[routes]]
name = "r"
listener = "l"
cluster = "c"

[[clusters]]
name = "c"
endpoints = ["127.0.0.1:1"]
"#;

    #[test]
    fn control_section_defaults_and_errors() {
        let plain = crate::parse(BASE, "t").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(plain.control, None);

        let text =
            format!("{BASE}\n[control]\ntrust_domain = \"example.org\"\n[control.enrollment]\n");
        let c = crate::parse(&text, "t").unwrap_or_else(|e| panic!("{e}"));
        let control = c.control.unwrap_or_else(|| panic!("control"));
        assert_eq!(
            control.trust_domain.map(|t| t.to_string()).as_deref(),
            Some("example.org")
        );
        let e = control.enrollment.unwrap_or_else(|| panic!("enrollment"));
        assert_eq!(e.address, super::DEFAULT_ENROLLMENT_ADDRESS);
        assert_eq!(e.renewal_grace, Duration::from_secs(86_400));
        assert_eq!(e.svid_ttl, None);

        let bad = format!(
            "{BASE}\n[control]\ntrust_domain = \"Bad Domain\"\n[control.enrollment]\naddress = \"nope\"\ndns_names = [\"a b\"]\nsvid_ttl = 60\nrenewal_gracee = \"1h\"\n[control.workload_api]\nsocket = \"rel.sock\"\n"
        );
        let err = crate::parse(&bad, "t")
            .err()
            .unwrap_or_else(|| panic!("accepted"));
        let paths: Vec<&str> = err.errors.iter().map(|e| e.path.as_str()).collect();
        for p in [
            "control.trust_domain",
            "control.enrollment.address",
            "control.enrollment.dns_names[0]",
            "control.enrollment.svid_ttl",
            "control.enrollment.renewal_gracee",
            "control.workload_api.socket",
        ] {
            assert!(paths.contains(&p), "{p} not in {paths:?}");
        }
    }
}
