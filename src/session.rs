//! Where the operator-side commands connect, and as whom.
//!
//! `veil login` checks the credentials with a Flight handshake and stores the
//! endpoint and the session token (never the operator's own token) in
//! `$XDG_CONFIG_HOME/veil/config.toml` (mode 0600). Every command then takes,
//! in order: `--endpoint`/`--token`, `VEIL_ENDPOINT`/`VEIL_TOKEN`, the stored
//! login.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::exit;

/// Connection flags shared by every operator command.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// Server endpoint, e.g. http://127.0.0.1:50051 [default: the stored login]
    #[arg(long, env = "VEIL_ENDPOINT")]
    pub endpoint: Option<String>,
    /// Bearer token: the operator's token or a session token [default: the stored login]
    #[arg(long, env = "VEIL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) that signed the server's certificate (https endpoints).
    #[arg(long, env = "VEIL_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for mTLS: its subject names your operator.
    #[arg(long, env = "VEIL_CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// Key (PEM) of the client certificate.
    #[arg(long, env = "VEIL_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

pub use crate::client::Target;

/// The stored login.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Login {
    /// Server endpoint.
    pub endpoint: String,
    /// Operator id.
    pub operator: String,
    /// Session token from the handshake.
    pub token: String,
    /// When the session token expires (RFC 3339), if the server said.
    pub expires: Option<String>,
    /// The CA certificate (PEM file) of an `https://` endpoint.
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
}

/// An error with the process exit code it should end with.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Exit {
    /// Exit code (see [`exit`]).
    pub code: u8,
    /// What to tell the user.
    pub message: String,
}

/// The configuration file: `$VEIL_CONFIG`, else
/// `$XDG_CONFIG_HOME/veil/config.toml`, else `~/.config/veil/config.toml`.
pub fn config_path() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("VEIL_CONFIG") {
        return Ok(PathBuf::from(p));
    }
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(
            std::env::var_os("HOME")
                .ok_or_else(|| anyhow!("neither XDG_CONFIG_HOME nor HOME is set"))?,
        )
        .join(".config"),
    };
    Ok(base.join("veil").join("config.toml"))
}

/// Reads the stored login, if any.
pub fn load() -> Result<Option<Login>> {
    let path = config_path()?;
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).map(Some).with_context(|| {
            format!(
                "{} is not a veil login; run `veil login` again",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Stores a login, readable by its owner only.
pub fn save(login: &Login) -> Result<PathBuf> {
    let path = config_path()?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let text = toml::to_string(login)?;
    // Written under a temporary name created 0600, then renamed: the token
    // is never readable by others, not even for a moment.
    let tmp = path.with_extension("toml.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

impl ConnectArgs {
    /// Flags and environment first, then the stored login.
    pub fn resolve(&self) -> Result<Target> {
        let stored =
            if self.endpoint.is_some() && (self.token.is_some() || self.client_cert.is_some()) {
                None
            } else {
                load()?
            }
            // A stored session goes only to the endpoint it was made for.
            .filter(|l| self.endpoint.as_ref().is_none_or(|e| *e == l.endpoint));
        let endpoint = self
            .endpoint
            .clone()
            .or_else(|| stored.as_ref().map(|l| l.endpoint.clone()));
        let token = self
            .token
            .clone()
            .or_else(|| stored.as_ref().map(|l| l.token.clone()));
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
        let identity = match (&self.client_cert, &self.client_key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            _ => None,
        };
        let ca_cert = self
            .ca_cert
            .clone()
            .or_else(|| stored.as_ref().and_then(|l| l.ca_cert.clone()));
        let tls = if ca_cert.is_some() || identity.is_some() {
            Some(crate::client::Tls {
                ca_pem: ca_cert.as_ref().map(read).transpose()?,
                identity,
            })
        } else {
            None
        };
        let token = token.or_else(|| tls.as_ref()?.identity.as_ref().map(|_| String::new()));
        match (endpoint, token) {
            (Some(endpoint), Some(token)) => Ok(Target {
                endpoint,
                token,
                tls,
            }),
            _ => bail!(Exit {
                code: exit::USAGE,
                message: "not logged in: run `veil login --endpoint URL --operator ID`, or give --endpoint and --token (or VEIL_ENDPOINT and VEIL_TOKEN)".into(),
            }),
        }
    }
}
