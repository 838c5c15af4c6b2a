//! A node's home directory: where each file lives, and the TOML config file's format.
//!
//! ```text
//! HOME/config.toml    the node's configuration (this module)
//! HOME/identity.key   the ed25519 secret key, mode 0600 (see `identity`)
//! HOME/store.redb     the redb store (see `store`)
//! HOME/node.api       written by a running node: the address its HTTP API listens on
//! ```

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};
use tidesync_proto::NodeId;

/// Default number of documents kept decoded in memory.
pub const DEFAULT_CACHE_DOCS: usize = 1024;
/// Default redb page cache, in bytes.
pub const DEFAULT_STORE_CACHE_BYTES: usize = 64 * 1024 * 1024;
/// Default libp2p listen address.
pub const DEFAULT_LISTEN: &str = "/ip4/0.0.0.0/tcp/7400";
/// Default HTTP API address.
pub const DEFAULT_API: &str = "127.0.0.1:7401";

/// The paths of one node's home directory.
#[derive(Debug, Clone)]
pub struct Home {
    pub dir: PathBuf,
}

impl Home {
    pub fn new(dir: impl Into<PathBuf>) -> Home {
        Home { dir: dir.into() }
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.toml")
    }
    pub fn key(&self) -> PathBuf {
        self.dir.join("identity.key")
    }
    pub fn store(&self) -> PathBuf {
        self.dir.join("store.redb")
    }
    pub fn api_file(&self) -> PathBuf {
        self.dir.join("node.api")
    }
}

/// The node's configuration, as stored in `HOME/config.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// A human-readable name for this node, shown to peers and in logs.
    pub name: String,
    /// libp2p addresses to listen on for peers.
    pub listen: Vec<Multiaddr>,
    pub api: ApiConfig,
    #[serde(default)]
    pub store: StoreConfig,
    /// The peers this node syncs with. Only these may connect.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerConfig>,
}

/// One configured peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// A local name for the peer, used by `tidesync peer` commands.
    pub name: String,
    /// The peer's node id (its libp2p PeerId).
    pub id: String,
    /// Where to dial it. A peer with no address is never dialed, but may connect to us.
    #[serde(default)]
    pub addrs: Vec<Multiaddr>,
    /// What may pass to and from the peer (see [`crate::policy`]).
    #[serde(flatten)]
    pub policy: crate::policy::Policy,
}

impl PeerConfig {
    /// The peer's node id; checked by [`Config::validate`].
    pub fn node_id(&self) -> Result<NodeId, String> {
        self.id
            .parse()
            .map_err(|e: tidesync_proto::IdError| format!("peer {:?}: {e}", self.name))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Address of the HTTP/JSON API. Binding anything but loopback requires `token`.
    pub listen: SocketAddr,
    /// Bearer token required on every request when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Documents kept decoded in memory (an LRU cache).
    #[serde(default = "default_cache_docs")]
    pub cache_docs: usize,
    /// redb's page cache, in bytes.
    #[serde(default = "default_store_cache_bytes")]
    pub cache_bytes: usize,
}

fn default_cache_docs() -> usize {
    DEFAULT_CACHE_DOCS
}
fn default_store_cache_bytes() -> usize {
    DEFAULT_STORE_CACHE_BYTES
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            cache_docs: DEFAULT_CACHE_DOCS,
            cache_bytes: DEFAULT_STORE_CACHE_BYTES,
        }
    }
}

/// Why a config file could not be read, checked or written. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "no tidesync node at {home}: {file} is missing (run `tidesync init --home {home}` first)"
    )]
    Missing { home: PathBuf, file: PathBuf },
    #[error("cannot read {file}: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {file} is not valid: {message}")]
    Invalid { file: PathBuf, message: String },
    #[error("cannot write {file}: {source}")]
    Write {
        file: PathBuf,
        source: std::io::Error,
    },
}

impl Config {
    /// Check rules that the TOML types alone do not express.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.trim().is_empty() {
            return Err("name must not be empty".into());
        }
        if !self.api.listen.ip().is_loopback() && self.api.token.is_none() {
            return Err(format!(
                "api.listen = {} is not a loopback address; set api.token so that every request must carry it",
                self.api.listen
            ));
        }
        if self.api.token.as_deref().is_some_and(|t| t.len() < 16) {
            return Err("api.token must be at least 16 characters".into());
        }
        if self.store.cache_docs == 0 {
            return Err("store.cache_docs must be at least 1".into());
        }
        let mut names = std::collections::HashSet::new();
        let mut ids = std::collections::HashSet::new();
        for peer in &self.peers {
            let ok_name = !peer.name.is_empty()
                && peer.name.len() <= 64
                && peer
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok_name {
                return Err(format!(
                    "peer name {:?} must be 1 to 64 ASCII letters, digits, '-' or '_'",
                    peer.name
                ));
            }
            let id = peer.node_id()?;
            peer.policy
                .validate()
                .map_err(|e| format!("peer {:?}: {e}", peer.name))?;
            if !names.insert(peer.name.clone()) {
                return Err(format!("peer name {:?} appears twice", peer.name));
            }
            if !ids.insert(id) {
                return Err(format!(
                    "peer id {} appears twice (peer {:?})",
                    peer.id, peer.name
                ));
            }
        }
        Ok(())
    }

    /// Add `peer`, or replace the peer of the same name.
    pub fn set_peer(&mut self, peer: PeerConfig) -> Result<(), String> {
        let mut next = self.clone();
        match next.peers.iter_mut().find(|p| p.name == peer.name) {
            Some(existing) => *existing = peer,
            None => next.peers.push(peer),
        }
        next.validate()?;
        *self = next;
        Ok(())
    }

    /// Remove the peer called `name`.
    pub fn remove_peer(&mut self, name: &str) -> Result<PeerConfig, String> {
        let i = self
            .peers
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| format!("no peer called {name:?} (see `tidesync peer ls`)"))?;
        Ok(self.peers.remove(i))
    }

    pub fn load(home: &Home) -> Result<Config, ConfigError> {
        let file = home.config();
        let text = match fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ConfigError::Missing {
                    home: home.dir.clone(),
                    file,
                });
            }
            Err(source) => return Err(ConfigError::Read { file, source }),
        };
        let config: Config = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            file: file.clone(),
            message: e.to_string(),
        })?;
        config
            .validate()
            .map_err(|message| ConfigError::Invalid { file, message })?;
        Ok(config)
    }

    /// Write the config atomically (write a temporary file, fsync, rename).
    pub fn save(&self, home: &Home) -> Result<(), ConfigError> {
        let file = home.config();
        let body = toml::to_string_pretty(self).map_err(|e| ConfigError::Invalid {
            file: file.clone(),
            message: e.to_string(),
        })?;
        let text =
            format!("# tidesync node configuration. See the README for every setting.\n{body}");
        write_atomic(&file, text.as_bytes(), 0o644)
            .map_err(|source| ConfigError::Write { file, source })
    }
}

/// Write `bytes` to `path` atomically with the given Unix mode.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(mode);
        }
        let mut f = opts.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Config {
        Config {
            name: "lab-a".into(),
            listen: vec![DEFAULT_LISTEN.parse().unwrap()],
            api: ApiConfig {
                listen: DEFAULT_API.parse().unwrap(),
                token: None,
            },
            store: StoreConfig::default(),
            peers: vec![],
        }
    }

    #[test]
    fn peers_are_validated() {
        let id = crate::identity::Identity::from_secret([1; 32])
            .node_id()
            .to_string();
        let mut c = sample();
        let hub = PeerConfig {
            name: "hub".into(),
            id: id.clone(),
            addrs: vec!["/ip4/127.0.0.1/tcp/7400".parse().unwrap()],
            policy: crate::policy::Policy {
                skip: vec![tidesync_proto::TypeName::new("Invoice").unwrap()],
                prefix: Some("H_".into()),
                prefixed: vec![tidesync_proto::TypeName::new("Sample").unwrap()],
                ..Default::default()
            },
        };
        c.set_peer(hub.clone()).unwrap();
        assert!(
            c.set_peer(PeerConfig {
                name: "other".into(),
                ..hub.clone()
            })
            .unwrap_err()
            .contains("twice")
        );
        assert!(
            c.set_peer(PeerConfig {
                name: "bad name".into(),
                ..hub.clone()
            })
            .is_err()
        );
        assert!(
            c.set_peer(PeerConfig {
                id: "nope".into(),
                ..hub.clone()
            })
            .is_err()
        );
        assert!(
            c.set_peer(PeerConfig {
                policy: crate::policy::Policy {
                    prefix: None,
                    ..hub.policy.clone()
                },
                ..hub.clone()
            })
            .unwrap_err()
            .contains("--prefixed needs --prefix")
        );
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path());
        c.save(&home).unwrap();
        assert_eq!(Config::load(&home).unwrap().peers, vec![hub]);
        assert!(c.remove_peer("hub").is_ok());
        assert!(c.remove_peer("hub").is_err());
    }

    #[test]
    fn config_round_trips_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path());
        sample().save(&home).unwrap();
        assert_eq!(Config::load(&home).unwrap(), sample());
        // A policy with a table (`refs`) after plain values, as `peer add --refs` writes it.
        let ty = |t: &str| tidesync_proto::TypeName::new(t).unwrap();
        let mut c = sample();
        c.peers.push(PeerConfig {
            name: "archive".into(),
            id: crate::identity::Identity::from_secret([2; 32])
                .node_id()
                .to_string(),
            addrs: vec![],
            policy: crate::policy::Policy {
                types: vec![ty("Volume")],
                refs: [(ty("Volume"), vec!["label_trees".into(), "owner".into()])].into(),
                ..Default::default()
            },
        });
        c.save(&home).unwrap();
        assert_eq!(Config::load(&home).unwrap(), c);
    }

    #[test]
    fn a_public_api_needs_a_token() {
        let mut c = sample();
        c.api.listen = "0.0.0.0:7401".parse().unwrap();
        assert!(c.validate().unwrap_err().contains("token"));
        c.api.token = Some("a-long-enough-secret".into());
        assert!(c.validate().is_ok());
    }

    #[test]
    fn broken_config_is_reported_with_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path());
        assert!(matches!(
            Config::load(&home),
            Err(ConfigError::Missing { .. })
        ));
        fs::write(home.config(), "name = 3\n").unwrap();
        let err = Config::load(&home).unwrap_err().to_string();
        assert!(err.contains("config.toml"), "{err}");
    }
}
