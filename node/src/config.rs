//! A node's home directory: where each file lives, and the TOML config file's format.
//!
//! ```text
//! HOME/               mode 0700
//! HOME/config.toml    the node's configuration (this module), mode 0600
//! HOME/identity.key   the ed25519 secret key, mode 0600 (see `identity`)
//! HOME/api.token      the API's bearer token, mode 0600 (see `api::token`)
//! HOME/store.redb     the redb store (see `store`), mode 0600
//! HOME/node.api       written by a running node: the address its HTTP API listens on
//! ```

use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;

use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};
use tidesync_proto::NodeId;

/// Default number of documents kept decoded in memory. A decoded Automerge document of ten
/// fields takes about 50 KB (measured: 1,024 of them held 52 MB more than 64 did), so 128 cost
/// about 6 MB; a document not cached is loaded from its saved state (issue 17's 100 MiB goal).
pub const DEFAULT_CACHE_DOCS: usize = 128;
/// Default redb page cache, in bytes: 16 MiB, within the 100 MiB a node aims to stay under.
/// The working set of a sync (the log's tail, the indexes' upper levels) fits in it; a
/// write's uncommitted pages are held beside it. Measured on a 50,000-object initial sync:
/// 32 MiB cost the receiver about 16 MB more peak memory and synced no faster.
pub const DEFAULT_STORE_CACHE_BYTES: usize = 16 * 1024 * 1024;
/// Default libp2p listen address over TCP.
pub const DEFAULT_LISTEN: &str = "/ip4/0.0.0.0/tcp/7400";
/// Default libp2p listen address over QUIC (UDP, the same port number).
pub const DEFAULT_LISTEN_QUIC: &str = "/ip4/0.0.0.0/udp/7400/quic-v1";
/// Default HTTP API address.
pub const DEFAULT_API: &str = "127.0.0.1:7401";
/// The config file format this version writes. 1: no `format` key, the API token in
/// `api.token`. 2: `format = 2`, the token in its own file (`api.token` is still read, and
/// moved out at the next start), `api.hosts`. 3: each `refs` field names the type it
/// references (`"owner:User"`); a `refs` field without one is refused with the new form.
/// 4: a peer may set `files` and `max-file-bytes` (older builds refuse those keys, so they
/// refuse format 4 by name). 5: `[fleet]` (`status-interval-secs`), and a peer's link
/// settings (`[peers.link]`: `max-rate`, `windows`, `budget`). 6: `[discovery]` (`mdns`).
/// 7: a peer's link may name the time `zone` of its windows and days. 8: a peer's link may
/// `prefer` a transport (`tcp` or `quic`), and a new home listens on QUIC as well. 9: a peer
/// may `relay-status` (the fleet view beyond direct peers) and name `priority` types.
pub const CONFIG_FORMAT: u32 = 9;
/// Default shortest time between two status records a node sends its peers, in seconds.
pub const DEFAULT_STATUS_INTERVAL_SECS: u64 = 30;
/// Bounds of `fleet.status-interval-secs`, in seconds.
pub const MIN_STATUS_INTERVAL_SECS: u64 = 1;
pub const MAX_STATUS_INTERVAL_SECS: u64 = 86_400;
/// Most extra host names `api.hosts` may list.
pub const MAX_API_HOSTS: usize = 64;

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
    pub fn token(&self) -> PathBuf {
        self.dir.join("api.token")
    }

    /// Create the home directory, mode 0700 (its parents with the default mode).
    pub fn create(&self) -> std::io::Result<()> {
        if let Some(parent) = self.dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent)?;
        }
        let mut builder = fs::DirBuilder::new();
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            builder.mode(0o700);
        }
        builder.create(&self.dir)
    }

    /// Take group and other access away from the home (0700) and from its config and store
    /// (0600), for homes made before these modes were set. Returns what was changed.
    pub fn restrict(&self) -> std::io::Result<Vec<PathBuf>> {
        use std::os::unix::fs::PermissionsExt;
        let mut changed = Vec::new();
        for (path, mode) in [
            (self.dir.clone(), 0o700),
            (self.config(), 0o600),
            (self.store(), 0o600),
        ] {
            let current = match fs::metadata(&path) {
                Ok(m) => m.permissions().mode() & 0o777,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if current & 0o077 != 0 {
                fs::set_permissions(&path, fs::Permissions::from_mode(current & mode))?;
                changed.push(path);
            }
        }
        Ok(changed)
    }
}

/// The node's configuration, as stored in `HOME/config.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The file's format ([`CONFIG_FORMAT`]); a file without it is format 1.
    #[serde(default = "format_1")]
    pub format: u32,
    /// A human-readable name for this node, shown to peers and in logs.
    pub name: String,
    /// libp2p addresses to listen on for peers.
    pub listen: Vec<Multiaddr>,
    pub api: ApiConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub fleet: FleetConfig,
    #[serde(default, skip_serializing_if = "DiscoveryConfig::is_off")]
    pub discovery: DiscoveryConfig,
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
    /// The peer's node id (its libp2p PeerId), written as text in the file.
    #[serde(with = "node_id_text")]
    pub id: NodeId,
    /// Where to dial it. A peer with no address is never dialed, but may connect to us.
    #[serde(default)]
    pub addrs: Vec<Multiaddr>,
    /// What may pass to and from the peer (see [`crate::policy`]).
    #[serde(flatten)]
    pub policy: crate::policy::Policy,
}

/// A node id in the config file: its text form (the libp2p PeerId), parsed once on load.
pub(crate) mod node_id_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use tidesync_proto::NodeId;

    pub fn serialize<S: Serializer>(id: &NodeId, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(id)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<NodeId, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(|e: tidesync_proto::IdError| {
            serde::de::Error::custom(format!("id {text:?}: {e}"))
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Address of the HTTP/JSON API. Every request must carry the token in `HOME/api.token`.
    pub listen: SocketAddr,
    /// Format 1 only: the bearer token. Read from old files and moved into `HOME/api.token`
    /// at the next start; never written.
    #[serde(default, skip_serializing)]
    pub token: Option<String>,
    /// Host names, besides the bind address and `localhost`, that requests may name in their
    /// `Host` header (and `Origin`), such as the machine's name when the API binds a public
    /// address. Anything else is refused, which defeats DNS rebinding.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
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

fn format_1() -> u32 {
    1
}
fn default_cache_docs() -> usize {
    DEFAULT_CACHE_DOCS
}
fn default_store_cache_bytes() -> usize {
    DEFAULT_STORE_CACHE_BYTES
}

/// Finding configured peers on the local network. Discovery is never authorisation: only
/// configured ids connect, and a discovered address is dialled only for a configured peer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DiscoveryConfig {
    /// Announce this node and listen for configured peers with libp2p mDNS (multicast on
    /// every local interface). Off unless set; configured addresses are dialled either way.
    #[serde(default)]
    pub mdns: bool,
}

impl DiscoveryConfig {
    fn is_off(&self) -> bool {
        !self.mdns
    }
}

/// The fleet view: how often this node's status record may go to its peers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FleetConfig {
    /// Shortest time between two status records sent (one is sent when the status changed),
    /// in seconds.
    #[serde(default = "default_status_interval")]
    pub status_interval_secs: u64,
}

fn default_status_interval() -> u64 {
    DEFAULT_STATUS_INTERVAL_SECS
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            status_interval_secs: DEFAULT_STATUS_INTERVAL_SECS,
        }
    }
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
        if !(MIN_STATUS_INTERVAL_SECS..=MAX_STATUS_INTERVAL_SECS)
            .contains(&self.fleet.status_interval_secs)
        {
            return Err(format!(
                "fleet.status-interval-secs = {} is out of bounds ({MIN_STATUS_INTERVAL_SECS} to {MAX_STATUS_INTERVAL_SECS})",
                self.fleet.status_interval_secs
            ));
        }
        if self.format == 0 || self.format > CONFIG_FORMAT {
            return Err(format!(
                "format = {} is not one this tidesync reads (1 to {CONFIG_FORMAT}); it may have been written by a newer version",
                self.format
            ));
        }
        if let Some(token) = &self.api.token {
            check_token(token).map_err(|e| format!("api.token: {e}"))?;
        }
        if self.api.hosts.len() > MAX_API_HOSTS {
            return Err(format!(
                "api.hosts lists {} names; at most {MAX_API_HOSTS}",
                self.api.hosts.len()
            ));
        }
        for host in &self.api.hosts {
            let ok = !host.is_empty()
                && host.len() <= 253
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':'));
            if !ok {
                return Err(format!(
                    "api.hosts: {host:?} is not a host name or IP address (no port, no scheme)"
                ));
            }
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
            let id = peer.id;
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

    /// Write the config atomically (write a temporary file, fsync, rename), mode 0600. A
    /// format-1 `api.token` is never written back: it goes to the token file first, unless
    /// that file exists, so rewriting an old config (`peer add` on a stopped node) keeps it.
    pub fn save(&self, home: &Home) -> Result<(), ConfigError> {
        if let Some(token) = &self.api.token {
            let file = home.token();
            if !file.exists() {
                crate::atomic::write_atomic(&file, format!("{token}\n").as_bytes(), 0o600)
                    .map_err(|source| ConfigError::Write { file, source })?;
            }
        }
        let file = home.config();
        let current = Config {
            format: CONFIG_FORMAT,
            ..self.clone()
        };
        let body = toml::to_string_pretty(&current).map_err(|e| ConfigError::Invalid {
            file: file.clone(),
            message: e.to_string(),
        })?;
        let text =
            format!("# tidesync node configuration. See the README for every setting.\n{body}");
        crate::atomic::write_atomic(&file, text.as_bytes(), 0o600)
            .map_err(|source| ConfigError::Write { file, source })
    }
}

/// Fewest characters a token may have (a hand-written or migrated one).
pub const MIN_TOKEN_CHARS: usize = 16;

/// Most characters a token may have.
pub const MAX_TOKEN_CHARS: usize = 512;

/// Check an API token's form: [`MIN_TOKEN_CHARS`] to [`MAX_TOKEN_CHARS`] visible ASCII characters
/// (it travels in an HTTP header).
pub fn check_token(token: &str) -> Result<(), String> {
    if token.len() < MIN_TOKEN_CHARS || token.len() > MAX_TOKEN_CHARS {
        return Err(format!(
            "a token must have {MIN_TOKEN_CHARS} to {MAX_TOKEN_CHARS} characters, not {}",
            token.len()
        ));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("a token may hold only visible ASCII characters".into());
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid config with no peers (tests elsewhere build on it too).
    pub(crate) fn sample() -> Config {
        Config {
            format: CONFIG_FORMAT,
            name: "lab-a".into(),
            listen: vec![DEFAULT_LISTEN.parse().unwrap()],
            api: ApiConfig {
                listen: DEFAULT_API.parse().unwrap(),
                token: None,
                hosts: vec![],
            },
            store: StoreConfig::default(),
            fleet: FleetConfig::default(),
            discovery: DiscoveryConfig::default(),
            peers: vec![],
        }
    }

    #[test]
    fn peers_are_validated() {
        let id = crate::identity::Identity::from_secret([1; 32]).node_id();
        let mut c = sample();
        let hub = PeerConfig {
            name: "hub".into(),
            id,
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
        // An id that is no node id is refused when the file is read, naming it.
        let mut text = toml::to_string_pretty(&c).unwrap();
        text = text.replace(&id.to_string(), "nope");
        let err = toml::from_str::<Config>(&text).unwrap_err().to_string();
        assert!(err.contains("\"nope\""), "{err}");
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
            id: crate::identity::Identity::from_secret([2; 32]).node_id(),
            addrs: vec![],
            policy: crate::policy::Policy {
                types: vec![ty("Volume")],
                refs: [(
                    ty("Volume"),
                    vec![
                        "label_trees:LabelTree".to_string().try_into().unwrap(),
                        "owner:User".to_string().try_into().unwrap(),
                    ],
                )]
                .into(),
                ..Default::default()
            },
        });
        c.save(&home).unwrap();
        assert_eq!(Config::load(&home).unwrap(), c);
    }

    #[test]
    fn a_format_1_file_with_a_token_is_read_and_rewritten_without_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path());
        fs::write(
            home.config(),
            "name = \"old\"\nlisten = []\n[api]\nlisten = \"127.0.0.1:7401\"\ntoken = \"a-long-enough-secret\"\n",
        )
        .unwrap();
        let mut c = Config::load(&home).unwrap();
        assert_eq!(c.format, 1);
        assert_eq!(c.api.token.as_deref(), Some("a-long-enough-secret"));
        c.api.token = None;
        c.save(&home).unwrap();
        let text = fs::read_to_string(home.config()).unwrap();
        assert!(
            text.contains(&format!("format = {CONFIG_FORMAT}")),
            "{text}"
        );
        assert!(!text.contains("token"), "{text}");
        assert_eq!(
            fs::metadata(home.config()).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // A token is never written to the config, even when one was read: it goes to the
        // token file, and an existing token file is left alone.
        c.api.token = Some("a-long-enough-secret".into());
        c.save(&home).unwrap();
        assert!(!fs::read_to_string(home.config()).unwrap().contains("token"));
        assert_eq!(
            crate::api::token::load(&home.token()).unwrap().as_deref(),
            Some("a-long-enough-secret")
        );
        c.api.token = Some("another-long-enough-secret".into());
        c.save(&home).unwrap();
        assert_eq!(
            crate::api::token::load(&home.token()).unwrap().as_deref(),
            Some("a-long-enough-secret")
        );
    }

    #[test]
    fn mdns_is_off_unless_set_and_round_trips() {
        let c = sample();
        let text = toml::to_string(&c).unwrap();
        assert!(!text.contains("discovery"), "off is not written: {text}");
        let mut c = sample();
        c.discovery.mdns = true;
        let text = toml::to_string(&c).unwrap();
        assert!(text.contains("[discovery]\nmdns = true"), "{text}");
        let back: Config = toml::from_str(&text).unwrap();
        assert!(back.discovery.mdns);
        // A format-5 file has no [discovery]: mDNS stays off.
        let old = text
            .replace("[discovery]\nmdns = true\n", "")
            .replace(&format!("format = {CONFIG_FORMAT}"), "format = 5");
        let back: Config = toml::from_str(&old).unwrap();
        assert!(!back.discovery.mdns && back.validate().is_ok());
    }

    #[test]
    fn newer_formats_short_tokens_and_bad_host_names_are_refused() {
        let mut c = sample();
        c.format = CONFIG_FORMAT + 1;
        assert!(c.validate().unwrap_err().contains("newer"));
        let mut c = sample();
        c.api.token = Some("short".into());
        assert!(c.validate().unwrap_err().contains("api.token"));
        let mut c = sample();
        c.api.hosts = vec!["lab-a.example.org".into()];
        assert!(c.validate().is_ok());
        c.api.hosts = vec!["http://evil/".into()];
        assert!(c.validate().unwrap_err().contains("api.hosts"));
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
