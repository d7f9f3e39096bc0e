//! `meshgate trust add|list|show|remove|refresh`: federated trust domains in the state
//! directory's trust store (docs/federation.md). Offline: these commands work on the files; a
//! running `meshgate run` polls the same store and reloads when a bundle changes.

use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use meshgate_control::bundle::TrustBundle;
use meshgate_control::clock::rfc3339;
use meshgate_control::federation::poller::refresh_one;
use meshgate_control::federation::store::{PeerConfig, PeerView, Stored, TrustStore};
use meshgate_control::federation::{ENDPOINT_ID_PATH, Profile};
use meshgate_control::{Ca, SpiffeId, TrustDomain};

use super::ca::{StateDirArg, print_json, usage};
use super::{Output, exit};

/// Deadline of one fetch from the CLI.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Subcommand)]
pub enum TrustCmd {
    /// Federate with a trust domain through its SPIFFE bundle endpoint, and fetch its bundle.
    Add(AddArgs),
    /// List federated trust domains: sequence, last refresh, last error.
    List(ListArgs),
    /// Show one federated trust domain with its authorities' fingerprints.
    Show(ShowArgs),
    /// Stop trusting a federated trust domain (its bundle is deleted; reload the gateway).
    Remove(RemoveArgs),
    /// Fetch now (all federated domains, or the ones named); exits 1 if any fetch failed.
    Refresh(RefreshArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
#[value(rename_all = "snake_case")]
pub enum ProfileArg {
    /// The endpoint presents an SVID of the peer's trust domain (needs --endpoint-spiffe-id
    /// and, for the first fetch, --bootstrap-bundle).
    HttpsSpiffe,
    /// The endpoint presents a Web PKI certificate for the URL's host name.
    HttpsWeb,
}

#[derive(Debug, Args)]
pub struct AddArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    #[arg(long, value_name = "TD")]
    pub trust_domain: String,
    /// The peer's bundle endpoint, `https://host:port[/path]`.
    #[arg(long, value_name = "URL")]
    pub endpoint: String,
    #[arg(long, value_enum)]
    pub profile: ProfileArg,
    /// https_spiffe: the SPIFFE ID the endpoint presents [default:
    /// spiffe://<TD>/meshgate/bundle-endpoint, what `meshgate bundle serve` presents].
    #[arg(long, value_name = "ID")]
    pub endpoint_spiffe_id: Option<String>,
    /// https_spiffe: the peer's bundle obtained out of band (SPIFFE JSON or PEM), used to
    /// authenticate the first fetch.
    #[arg(long, value_name = "FILE")]
    pub bootstrap_bundle: Option<std::path::PathBuf>,
    /// https_web: CA certificates (PEM) to verify the endpoint with instead of the system's.
    #[arg(long, value_name = "FILE")]
    pub web_ca: Option<std::path::PathBuf>,
    /// Only record the peer; the first fetch happens at the next poll or `trust refresh`.
    #[arg(long)]
    pub no_fetch: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    pub trust_domain: String,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct RemoveArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    pub trust_domain: String,
}

#[derive(Debug, Args)]
pub struct RefreshArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    /// Trust domains to refresh [default: all].
    pub trust_domains: Vec<String>,
}

pub fn run(cmd: TrustCmd) -> u8 {
    match cmd {
        TrustCmd::Add(a) => add(a),
        TrustCmd::List(a) => list(a),
        TrustCmd::Show(a) => show(a),
        TrustCmd::Remove(a) => remove(a),
        TrustCmd::Refresh(a) => refresh(a),
    }
}

fn parse_td(flag: &str, v: &str) -> Result<TrustDomain, u8> {
    TrustDomain::parse(v).map_err(|e| usage(format!("{flag}: {e}")))
}

fn add(a: AddArgs) -> u8 {
    let td = match parse_td("--trust-domain", &a.trust_domain) {
        Ok(td) => td,
        Err(c) => return c,
    };
    if let Ok(ca) = Ca::open(&a.state.state_dir)
        && ca.trust_domain() == &td
    {
        return usage(format!(
            "{td} is this CA's own trust domain; federate with other trust domains only"
        ));
    }
    if let Err(e) = a
        .endpoint
        .parse::<meshgate_control::agent::client::ServerUrl>()
    {
        return usage(format!("--endpoint: {e}"));
    }
    let store = TrustStore::new(&a.state.state_dir);
    let now = time::OffsetDateTime::now_utc();
    let bootstrap = match &a.bootstrap_bundle {
        None => None,
        Some(path) => {
            let data = match std::fs::read(path) {
                Ok(d) => d,
                Err(e) => return usage(format!("--bootstrap-bundle {}: {e}", path.display())),
            };
            match TrustBundle::parse(&td, TrustBundle::sniff(&data), &data) {
                Ok(b) => Some(b),
                Err(e) => {
                    return usage(format!(
                        "--bootstrap-bundle {}: not a bundle of {td}: {e}",
                        path.display()
                    ));
                }
            }
        }
    };
    let (profile, endpoint_spiffe_id) = match a.profile {
        ProfileArg::HttpsWeb => {
            if a.endpoint_spiffe_id.is_some() {
                return usage("--endpoint-spiffe-id goes with --profile https_spiffe");
            }
            (Profile::HttpsWeb, None)
        }
        ProfileArg::HttpsSpiffe => {
            let text = a
                .endpoint_spiffe_id
                .clone()
                .unwrap_or_else(|| format!("{}{ENDPOINT_ID_PATH}", td.id_string()));
            let id = match SpiffeId::parse(&text) {
                Ok(id) => id,
                Err(e) => return usage(format!("--endpoint-spiffe-id: {e}")),
            };
            let auth_td = id.trust_domain();
            let have_auth = if auth_td == &td {
                bootstrap.is_some()
            } else {
                store.bundle(auth_td).ok().flatten().is_some()
            };
            if !have_auth {
                return usage(format!(
                    "--profile https_spiffe authenticates the endpoint with the bundle of {auth_td}: pass it with --bootstrap-bundle FILE (obtained out of band, e.g. `meshgate bundle export --format spiffe` on the peer){}",
                    if auth_td == &td {
                        String::new()
                    } else {
                        format!(", after federating with {auth_td}")
                    }
                ));
            }
            (Profile::HttpsSpiffe, Some(id))
        }
    };
    if a.web_ca.is_some() && profile != Profile::HttpsWeb {
        return usage("--web-ca goes with --profile https_web");
    }
    let peer = PeerConfig {
        version: 1,
        trust_domain: td.clone(),
        endpoint: Some(a.endpoint.clone()),
        profile,
        endpoint_spiffe_id,
        web_ca_file: a.web_ca.clone(),
        added_at: now,
    };
    if let Err(e) = store.add(&peer, bootstrap.as_ref(), now) {
        eprintln!("error: {e}");
        return exit::FAILURE;
    }
    println!("added {td} ({profile}, {})", a.endpoint);
    if a.no_fetch {
        return exit::OK;
    }
    match refresh_one(&store, &td, FETCH_TIMEOUT) {
        Ok(_) => {
            let st = store.status(&td).unwrap_or_default();
            println!(
                "fetched the bundle of {td}: sequence {}, {} authorities, refresh hint {}s",
                st.sequence, st.authorities, st.refresh_hint_secs
            );
            exit::OK
        }
        Err(e) => {
            eprintln!(
                "warning: the first fetch failed: {e}\n  the peer is recorded; `meshgate run` keeps polling it, or run `meshgate trust refresh {td}`"
            );
            exit::FAILURE
        }
    }
}

fn ago(t: Option<time::OffsetDateTime>) -> String {
    t.map(rfc3339).unwrap_or_else(|| "never".into())
}

fn list(a: ListArgs) -> u8 {
    let store = TrustStore::new(&a.state.state_dir);
    let views = match store.list() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::FAILURE;
        }
    };
    match a.output {
        Output::Json => print_json(&views),
        Output::Table => {
            if views.is_empty() {
                println!(
                    "no federated trust domains in {} (add one with `meshgate trust add`)",
                    a.state.state_dir.display()
                );
                return exit::OK;
            }
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED);
            t.set_header([
                "trust domain",
                "profile",
                "endpoint",
                "sequence",
                "authorities",
                "last refresh",
                "last error",
            ]);
            for v in &views {
                t.add_row([
                    v.config.trust_domain.to_string(),
                    v.config.profile.to_string(),
                    v.config.endpoint.clone().unwrap_or_else(|| "-".into()),
                    v.status.sequence.to_string(),
                    v.status.authorities.to_string(),
                    ago(v.status.last_refresh),
                    match &v.status.last_error {
                        None => "-".into(),
                        Some(e) => format!(
                            "{e} ({} in a row, at {})",
                            v.status.consecutive_failures,
                            ago(v.status.last_attempt)
                        ),
                    },
                ]);
            }
            println!("{t}");
            exit::OK
        }
    }
}

fn show_table(v: &PeerView) {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    let row = |t: &mut Table, k: &str, v: String| {
        t.add_row([k.to_owned(), v]);
    };
    row(&mut t, "trust domain", v.config.trust_domain.to_string());
    row(&mut t, "profile", v.config.profile.to_string());
    row(
        &mut t,
        "endpoint",
        v.config.endpoint.clone().unwrap_or_else(|| "-".into()),
    );
    if let Some(id) = &v.config.endpoint_spiffe_id {
        row(&mut t, "endpoint SPIFFE ID", id.to_string());
    }
    row(&mut t, "sequence", v.status.sequence.to_string());
    row(
        &mut t,
        "refresh hint",
        format!("{}s", v.status.refresh_hint_secs),
    );
    row(&mut t, "last refresh", ago(v.status.last_refresh));
    row(&mut t, "last update", ago(v.status.last_update));
    row(
        &mut t,
        "last error",
        v.status.last_error.clone().unwrap_or_else(|| "-".into()),
    );
    row(
        &mut t,
        "failures",
        format!(
            "{} in a row, {} in total",
            v.status.consecutive_failures, v.status.failures_total
        ),
    );
    row(&mut t, "bundle (PEM)", v.bundle_pem.display().to_string());
    for (i, f) in v.fingerprints.iter().enumerate() {
        row(&mut t, &format!("authority[{i}] sha256"), f.clone());
    }
    println!("{t}");
}

fn show(a: ShowArgs) -> u8 {
    let td = match parse_td("TRUST_DOMAIN", &a.trust_domain) {
        Ok(td) => td,
        Err(c) => return c,
    };
    match TrustStore::new(&a.state.state_dir).view(&td) {
        Ok(v) => match a.output {
            Output::Json => print_json(&v),
            Output::Table => {
                show_table(&v);
                exit::OK
            }
        },
        Err(e) => usage(e),
    }
}

fn remove(a: RemoveArgs) -> u8 {
    let td = match parse_td("TRUST_DOMAIN", &a.trust_domain) {
        Ok(td) => td,
        Err(c) => return c,
    };
    match TrustStore::new(&a.state.state_dir).remove(&td) {
        Ok(()) => {
            println!(
                "removed {td}; a listener that names it in trust_bundles now fails to load: remove it from the config and reload"
            );
            exit::OK
        }
        Err(e) => usage(e),
    }
}

fn refresh(a: RefreshArgs) -> u8 {
    let store = TrustStore::new(&a.state.state_dir);
    let domains = if a.trust_domains.is_empty() {
        match store.domains() {
            Ok(d) => d,
            Err(e) => {
                eprintln!("error: {e}");
                return exit::FAILURE;
            }
        }
    } else {
        let mut out = Vec::new();
        for t in &a.trust_domains {
            match parse_td("TRUST_DOMAINS", t) {
                Ok(td) => out.push(td),
                Err(c) => return c,
            }
        }
        out
    };
    let mut failed = false;
    for td in &domains {
        match refresh_one(&store, td, FETCH_TIMEOUT) {
            Ok(s) => {
                let st = store.status(td).unwrap_or_default();
                println!(
                    "{td}: {} (sequence {}, {} authorities)",
                    match s {
                        Stored::Updated => "updated",
                        Stored::Unchanged => "unchanged",
                    },
                    st.sequence,
                    st.authorities
                );
            }
            Err(e) => {
                failed = true;
                eprintln!("{td}: failed, the last good bundle stays in force: {e}");
            }
        }
    }
    if failed { exit::FAILURE } else { exit::OK }
}
