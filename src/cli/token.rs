//! `meshgate token create|list|revoke`: single-use join tokens for enrolling VMs. Only a hash of
//! each token is stored; `create` prints the token once, on stdout.

use clap::{Args, Subcommand};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use meshgate_control::TokenError;
use meshgate_control::ca::DEFAULT_TOKEN_TTL;
use meshgate_control::clock::rfc3339;

use super::ca::{StateDirArg, fail, open, parse_duration, parse_spiffe_id, print_json};
use super::{Output, exit};

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Create a join token for one SPIFFE ID and print it (shown only this once).
    Create(CreateArgs),
    /// List join tokens (ids, identities, status; never the tokens themselves).
    List(ListArgs),
    /// Revoke a join token by id so it can no longer be used.
    Revoke(RevokeArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    /// The identity the token enrolls, in the CA's trust domain.
    #[arg(long, value_name = "ID")]
    pub spiffe_id: String,
    /// How long the token can be used [default: 1h, at most 7d].
    #[arg(long, value_name = "DUR")]
    pub ttl: Option<String>,
    /// `json` prints {id, token, spiffe_id, expires_at}; the default prints only the token.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    /// Token id, as `token list` prints it (the 8 hex digits after `mgjt.`).
    pub id: String,
}

pub fn run(cmd: TokenCmd) -> u8 {
    match cmd {
        TokenCmd::Create(a) => create(a),
        TokenCmd::List(a) => list(a),
        TokenCmd::Revoke(a) => revoke(a),
    }
}

fn create(a: CreateArgs) -> u8 {
    let id = match parse_spiffe_id(&a.spiffe_id) {
        Ok(id) => id,
        Err(code) => return code,
    };
    let ttl = match a
        .ttl
        .as_deref()
        .map(|v| parse_duration("ttl", v))
        .transpose()
    {
        Ok(t) => t.unwrap_or(DEFAULT_TOKEN_TTL),
        Err(code) => return code,
    };
    let ca = match open(&a.state.state_dir) {
        Ok(ca) => ca,
        Err(code) => return code,
    };
    let (token, rec) = match ca.create_token(&id, ttl) {
        Ok(t) => t,
        Err(e) => return fail(&e),
    };
    match a.output {
        Output::Json => print_json(&serde_json::json!({
            "id": rec.id,
            "token": token.expose(),
            "spiffe_id": rec.spiffe_id,
            "expires_at": rfc3339(rec.expires_at),
        })),
        Output::Table => {
            println!("{}", token.expose());
            eprintln!(
                "join token {} for {} (single use, expires {}); it is not stored and cannot be shown again",
                rec.id,
                rec.spiffe_id,
                rfc3339(rec.expires_at)
            );
            exit::OK
        }
    }
}

fn list(a: ListArgs) -> u8 {
    let ca = match open(&a.state.state_dir) {
        Ok(ca) => ca,
        Err(code) => return code,
    };
    let tokens = match ca.tokens().list() {
        Ok(t) => t,
        Err(e) => return fail(&e.into()),
    };
    let now = ca.clock().now();
    match a.output {
        Output::Json => print_json(
            &tokens
                .iter()
                .map(|t| {
                    serde_json::json!({
                        "id": t.id,
                        "spiffe_id": t.spiffe_id,
                        "status": t.status(now),
                        "created_at": rfc3339(t.created_at),
                        "expires_at": rfc3339(t.expires_at),
                        "used_at": t.used_at.map(rfc3339),
                        "revoked_at": t.revoked_at.map(rfc3339),
                    })
                })
                .collect::<Vec<_>>(),
        ),
        Output::Table => {
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED);
            t.set_header(["id", "SPIFFE ID", "status", "expires", "used"]);
            for r in &tokens {
                t.add_row([
                    r.id.clone(),
                    r.spiffe_id.to_string(),
                    r.status(now).to_string(),
                    rfc3339(r.expires_at),
                    r.used_at.map(rfc3339).unwrap_or_else(|| "-".into()),
                ]);
            }
            println!("{t}");
            exit::OK
        }
    }
}

fn revoke(a: RevokeArgs) -> u8 {
    let ca = match open(&a.state.state_dir) {
        Ok(ca) => ca,
        Err(code) => return code,
    };
    match ca.tokens().revoke(&a.id) {
        Ok(r) => {
            println!("revoked join token {} for {}", r.id, r.spiffe_id);
            exit::OK
        }
        Err(TokenError::NoSuchId(id)) => {
            eprintln!("error: no join token with id {id:?}; see `meshgate token list`");
            exit::CONFIG
        }
        Err(e) => fail(&e.into()),
    }
}
