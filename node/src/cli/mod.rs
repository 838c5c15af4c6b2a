//! The `tidesync` command line: argument parsing (clap) and one function per command.

mod commands;
mod print;

use commands::{init, object_command};

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use libp2p::Multiaddr;
use tidesync_proto::{NodeId, ObjectId, TypeName};

use crate::client::{Client, ClientError};
use crate::config::{
    ApiConfig, CONFIG_FORMAT, Config, ConfigError, DEFAULT_API, DEFAULT_LISTEN,
    DEFAULT_LISTEN_QUIC, Home, StoreConfig,
};
use crate::core::{History, Status};
use crate::daemon::RunError;
use crate::identity::{Identity, KeyError};
use crate::store::{Store, StoreError};

/// Ids fetched per request by `tidesync ls`.
pub const LS_PAGE_IDS: usize = 1_000;

#[derive(Debug, Parser)]
#[command(
    name = "tidesync",
    version,
    about = "A peer-to-peer, multi-master sync node for typed objects kept as signed Automerge documents",
    long_about = None
)]
pub struct Cli {
    /// The node's home directory (its config, key and store).
    #[arg(long, env = "TIDESYNC_HOME", global = true, value_name = "DIR")]
    pub home: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// What `tidesync file` does.
#[derive(Debug, Subcommand)]
pub enum FileAction {
    /// Store a file; prints its hash and size as JSON.
    Add { path: std::path::PathBuf },
    /// Write a stored file to PATH. Exits 3 if it is not stored here.
    Get {
        hash: String,
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// List the stored files: hash and size, one per line.
    Ls {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// List the want-list instead: files referenced here and not stored yet, with the
        /// peers they are asked of and how far each download is.
        #[arg(long)]
        missing: bool,
    },
    /// Re-hash every stored file and report any whose bytes rotted on disk; a rotted file is
    /// removed and, where an object still refers to it, fetched again from the peers.
    Verify {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove the stored files that no object refers to now (a file only an object's history
    /// refers to goes too), except those stored within the grace period.
    Gc {
        /// Keep unreferenced files stored less than this many seconds ago [default: 3600].
        #[arg(long, value_name = "SECS")]
        grace: Option<u64>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// What `tidesync held` does besides listing.
#[derive(Debug, Subcommand)]
pub enum HeldAction {
    /// Remove the held changes named (all of them when neither --peer nor --object is given).
    Purge {
        /// Only what this configured peer sent.
        #[arg(long)]
        peer: Option<String>,
        /// Only changes to this object: TYPE and ID.
        #[arg(long, num_args = 2, value_names = ["TYPE", "ID"])]
        object: Option<Vec<String>>,
    },
}

/// A `tidesync` subcommand.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new node in --home: its key, config and empty store.
    Init {
        /// A human-readable name for the node [default: the home directory's name].
        #[arg(long)]
        name: Option<String>,
        /// libp2p address to listen on for peers (repeatable).
        #[arg(long, value_name = "MULTIADDR", default_values = [DEFAULT_LISTEN, DEFAULT_LISTEN_QUIC])]
        listen: Vec<Multiaddr>,
        /// Address of the HTTP/JSON API. Every request must carry the bearer token that init
        /// writes to HOME/api.token (mode 0600).
        #[arg(long, value_name = "ADDR", default_value = DEFAULT_API)]
        api: std::net::SocketAddr,
        /// A host name, besides the API's address and localhost, that API requests may name
        /// in their Host header (repeatable; saved as api.hosts).
        #[arg(long = "api-host", value_name = "NAME")]
        api_hosts: Vec<String>,
        /// Find configured peers on the local network with mDNS (saved as discovery.mdns):
        /// for a ship's LAN with no fixed addresses. Only configured peers ever connect.
        #[arg(long)]
        mdns: bool,
    },
    /// Run the node until Ctrl-C or SIGTERM. Logs go to stderr; filter them with RUST_LOG.
    Run,
    /// Set fields of an object, creating it if needed. A null value removes a field.
    Put {
        /// The object's type, such as Sample.
        #[arg(value_name = "TYPE")]
        ty: String,
        /// The object's id, such as S-001.
        id: String,
        /// A JSON object of fields, or - to read it from standard input.
        json: String,
        /// Store a file and set a field to a reference to it: FIELD=PATH (repeatable). The
        /// file is durable before the change that references it is made.
        #[arg(long = "file", value_name = "FIELD=PATH")]
        files: Vec<String>,
    },
    /// Store, read and list files (content-addressed by their BLAKE3 hash).
    File {
        #[command(subcommand)]
        action: FileAction,
    },
    /// Print an object as one line of JSON. Exits 3 if it does not exist.
    Get {
        #[arg(value_name = "TYPE")]
        ty: String,
        id: String,
    },
    /// List the ids of the live objects of a type, one per line.
    Ls {
        #[arg(value_name = "TYPE")]
        ty: String,
    },
    /// Show every change of an object: author, time, hash and whether its signature verifies.
    History {
        #[arg(value_name = "TYPE")]
        ty: String,
        id: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete an object. Exits 3 if it does not exist.
    Rm {
        #[arg(value_name = "TYPE")]
        ty: String,
        id: String,
    },
    /// Resolve a field written concurrently on several nodes by picking one of its values (see
    /// `tidesync conflicts`): an ordinary signed change that syncs like any other, after which
    /// the field leaves the inbox on every node. A name collision is resolved with
    /// `tidesync rename` instead (names are local).
    Resolve {
        #[arg(value_name = "TYPE")]
        ty: String,
        id: String,
        /// The field: its name, or its path for a nested one (`meta/lab`, `steps/2`).
        path: String,
        /// The value id to keep, as `tidesync conflicts` lists it.
        #[arg(long, value_name = "VALUE_ID")]
        pick: String,
    },
    /// Give an object a new name on this node: how a name collision (two objects of one type
    /// and name, one kept as `ID~<document id>`) is resolved. Names are local, so nothing is
    /// written to the document and nothing syncs; the change feed shows the new name, beside
    /// the document id that does not change. Exits 3 if no object has the name.
    Rename {
        #[arg(value_name = "TYPE")]
        ty: String,
        id: String,
        /// The new name: one no other object of the type has here, without `~`.
        #[arg(value_name = "NEW_ID")]
        to: String,
    },
    /// Print the node's change feed after --since, one JSON line per change.
    Changes {
        /// Print changes with a SEQ greater than this.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// Most changes to print.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// If there are none yet, wait up to this many seconds for one (running node only).
        #[arg(long, default_value_t = 0)]
        wait: u64,
    },
    /// Print this node's id (its libp2p PeerId).
    Id,
    /// Start a hub and two labs on 127.0.0.1 in temporary homes, write and concurrently edit
    /// objects, show them converge, and stop everything (within a minute). Needs no --home.
    Demo,
    /// Configure the peers this node syncs with (a running node applies changes at once).
    Peer {
        #[command(subcommand)]
        command: PeerCommand,
    },
    /// Every lab and ship this node has heard of, offline ones too: each one's last status
    /// record (its peers, lag, held changes, refusals, wanted files, store size, version, key
    /// fingerprint) with its age, and its last bundle receipt.
    Fleet {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// What would cross to a peer now and what it costs, before anything is sent: changes
    /// and bytes by its policy, the files those objects refer to, and the time the link's
    /// rate, windows and budget make of it.
    Plan {
        /// The configured peer.
        #[arg(long = "for", value_name = "PEER")]
        peer: String,
        /// Everything the policy lets out, not only what the peer has not acknowledged (as
        /// `export --all`).
        #[arg(long)]
        all: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Send to a peer now, whatever its sync windows and daily budget say, until it is in
    /// sync: the operator's one-off override (running node, connected peer).
    Sync {
        /// The configured peer.
        #[arg(long = "now", value_name = "PEER")]
        now: String,
    },
    /// Print a link to the running node's status page with a one-time login code (valid for
    /// two minutes; the browser gets a session cookie and the API token stays out of it).
    Open,
    /// Show the node's id, name, object counts and store size.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List changes held for missing dependencies (by peer or by object), with each sender's
    /// tally against its quota; `held purge` removes them.
    Held {
        /// Only what this configured peer sent.
        #[arg(long)]
        peer: Option<String>,
        /// Only changes to this object: TYPE and ID.
        #[arg(long, num_args = 2, value_names = ["TYPE", "ID"])]
        object: Option<Vec<String>>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<HeldAction>,
    },
    /// The conflicts inbox: fields written concurrently on several nodes (every value, its
    /// author and time; pick one with `tidesync resolve`), name collisions (two objects that
    /// arrived under one type and id; both are kept, the second reachable as `id~<doc id>`),
    /// equivocations (two changes an author signed with one actor and sequence number; both
    /// are refused with what depends on them), changes refused by policy, changes held for
    /// missing dependencies and wanted files that have not arrived.
    Conflicts {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write a bundle for a peer: the signed changes it has not acknowledged, filtered by this
    /// node's policy for it, signed by this node and encrypted to the peer's key.
    Export {
        /// The configured peer the bundle is for.
        #[arg(long = "for", value_name = "PEER")]
        peer: String,
        /// The bundle file to write (replaced only once the bundle is complete).
        #[arg(long, value_name = "FILE", required_unless_present = "plan")]
        out: Option<PathBuf>,
        /// Print what the bundle would carry (as `tidesync plan`) and write nothing.
        #[arg(long)]
        plan: bool,
        /// Everything the policy lets out, not only what the peer has not acknowledged.
        #[arg(long)]
        all: bool,
        /// Do not encrypt (the bundle is still signed; anyone holding it can read it).
        #[arg(long)]
        plain: bool,
        /// Carry the files the peer lacks that the objects refer to, where its policy lets
        /// them go (the default).
        #[arg(long, conflicts_with = "no_files")]
        files: bool,
        /// Leave the files out: metadata only (the peer wants them, and a later bundle or a
        /// connection brings them).
        #[arg(long)]
        no_files: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Import a bundle from a configured peer: verify it and every change in it, check them
    /// against this node's policy for that peer, and store them. A bad bundle is refused whole.
    Import {
        /// The bundle file.
        file: PathBuf,
        /// Report what the import would add, update and reject, and write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum PeerCommand {
    /// Add a peer (or replace the one of that name). Only configured peers may connect.
    Add {
        /// A local name for the peer, such as hub.
        name: String,
        /// The peer's node id, as `tidesync id` prints it on the peer.
        #[arg(long, value_name = "PEERID")]
        id: NodeId,
        /// Where to dial the peer (repeatable). Without one, the peer must dial us.
        #[arg(long = "addr", value_name = "MULTIADDR")]
        addrs: Vec<Multiaddr>,
        #[command(flatten)]
        policy: Box<PolicyArgs>,
    },
    /// Change a configured peer's policy (only the options given change; an empty list,
    /// such as `--skip ""`, clears one). A running node applies it at once.
    Set {
        name: String,
        /// Replace the addresses to dial (repeatable).
        #[arg(long = "addr", value_name = "MULTIADDR")]
        addrs: Vec<Multiaddr>,
        #[command(flatten)]
        policy: Box<PolicyArgs>,
    },
    /// List the configured peers and their sync state.
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a peer; its connection is closed.
    Rm { name: String },
}

/// The policy options of `peer add` and `peer set`; type lists are comma-separated.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PolicyArgs {
    /// Which way objects flow: both, send (we only send to this peer) or receive (we only
    /// take from it).
    #[arg(long, value_enum)]
    direction: Option<crate::policy::Direction>,
    /// The types exchanged with this peer; empty means all.
    #[arg(long, value_name = "T,...")]
    types: Option<String>,
    /// Types never sent to or taken from this peer.
    #[arg(long, value_name = "T,...")]
    skip: Option<String>,
    /// Types whose objects come from this peer alone; nobody here may change them.
    #[arg(long, value_name = "T,...")]
    read_only: Option<String>,
    /// Types for which we take this peer's changes only to objects this node created.
    #[arg(long, value_name = "T,...")]
    update_only: Option<String>,
    /// Types we send to this peer but never take from it (what it holds read-only).
    #[arg(long, value_name = "T,...")]
    send_only: Option<String>,
    /// Prefix for the local names of this peer's objects of the --prefixed types.
    #[arg(long, value_name = "P")]
    prefix: Option<String>,
    /// Types whose objects from this peer appear here under --prefix.
    #[arg(long, value_name = "T,...")]
    prefixed: Option<String>,
    /// Fields of TYPE that reference other objects ("Type/Id" strings, alone or in arrays),
    /// each with the type it references: `Volume=owner:User,label_trees:LabelTree`. The
    /// objects of that type they reference travel with it, unless --skip lists the type.
    /// Repeat for more types; `TYPE=` alone drops TYPE's references.
    #[arg(long, value_name = "TYPE=FIELD:TARGET,...")]
    refs: Vec<String>,
    /// The only fields of TYPE this peer is sent: it gets a view of each object, written and
    /// signed by this node, and never the object's own history. Repeat for more types;
    /// `TYPE=` alone drops the restriction.
    #[arg(long, value_name = "TYPE=FIELD,...")]
    fields: Vec<String>,
    /// When the files our objects refer to move: eager (as the objects arrive), on-demand
    /// (on the first read) or never (the references only).
    #[arg(long, value_enum)]
    files: Option<crate::policy::FilesMode>,
    /// Largest file fetched from or served to this peer, in bytes (0: no limit).
    #[arg(long, value_name = "BYTES")]
    max_file_bytes: Option<u64>,
    /// Most bytes a second sent to this peer, on average (0: no limit).
    #[arg(long, value_name = "BYTES")]
    max_rate: Option<u64>,
    /// A daily window in which the link may carry anything, HH:MM-HH:MM in UTC or in --zone
    /// (repeatable; `--window none` removes them). Outside them nothing new starts.
    #[arg(long = "window", value_name = "HH:MM-HH:MM")]
    windows: Vec<String>,
    /// Most bytes sent to this peer per day, UTC or in --zone (0: no limit).
    #[arg(long, value_name = "BYTES")]
    budget: Option<u64>,
    /// The time zone of the windows and of the budget's days, as the time zone database
    /// names it (`Europe/Oslo`); `UTC` or `none` for UTC, the default.
    #[arg(long, value_name = "ZONE")]
    zone: Option<String>,
    /// Dial the peer's addresses of this transport first (`quic` on a lossy link), then the
    /// others; `any` dials them all at once, the default.
    #[arg(long, value_name = "tcp|quic|any")]
    prefer: Option<String>,
    /// Types whose changes go to this peer before the rest of our log (`Sample,Method`): on a
    /// thin link, a day's records of these types never wait behind older bulk.
    #[arg(long, value_name = "T,...")]
    priority: Option<String>,
    /// Pass the status records of other nodes (the fleet view) to and from this peer, so
    /// that a hub beyond this node sees them too (default false: direct peers only).
    #[arg(long, value_name = "true|false")]
    relay_status: Option<bool>,
}

impl PolicyArgs {
    /// Apply the options given to `policy`.
    pub fn apply(&self, policy: &mut crate::policy::Policy) -> Result<(), CliError> {
        let list = |s: &Option<String>, into: &mut Vec<TypeName>| -> Result<(), CliError> {
            if let Some(s) = s {
                *into = s
                    .split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(|t| TypeName::new(t).map_err(|e| CliError::Usage(format!("{t:?}: {e}"))))
                    .collect::<Result<_, _>>()?;
            }
            Ok(())
        };
        if let Some(d) = self.direction {
            policy.direction = d;
        }
        list(&self.types, &mut policy.types)?;
        list(&self.skip, &mut policy.skip)?;
        list(&self.read_only, &mut policy.read_only)?;
        list(&self.update_only, &mut policy.update_only)?;
        list(&self.send_only, &mut policy.send_only)?;
        list(&self.prefixed, &mut policy.prefixed)?;
        list(&self.priority, &mut policy.priority)?;
        if let Some(p) = &self.prefix {
            policy.prefix = (!p.is_empty()).then(|| p.clone());
        }
        type_fields("--refs", &self.refs, &mut policy.refs)?;
        type_fields("--fields", &self.fields, &mut policy.fields)?;
        if let Some(f) = self.files {
            policy.files = f;
        }
        if let Some(n) = self.max_file_bytes {
            policy.max_file_bytes = (n > 0).then_some(n);
        }
        if let Some(r) = self.relay_status {
            policy.relay_status = r;
        }
        if let Some(n) = self.max_rate {
            policy.link.max_rate = (n > 0).then_some(n);
        }
        if let Some(n) = self.budget {
            policy.link.budget = (n > 0).then_some(n);
        }
        if let Some(z) = &self.zone {
            policy.link.zone = match z.as_str() {
                "none" | "UTC" => None,
                name => {
                    Some(crate::link::Zone::try_from(name.to_string()).map_err(CliError::Usage)?)
                }
            };
        }
        if let Some(p) = &self.prefer {
            policy.link.prefer = match p.as_str() {
                "any" => None,
                other => Some(
                    <crate::link::Transport as clap::ValueEnum>::from_str(other, true).map_err(
                        |_| CliError::Usage(format!("--prefer {other:?}: tcp, quic or any")),
                    )?,
                ),
            };
        }
        if !self.windows.is_empty() {
            policy.link.windows = self
                .windows
                .iter()
                .filter(|w| w.as_str() != "none")
                .map(|w| crate::link::Window::try_from(w.clone()).map_err(CliError::Usage))
                .collect::<Result<_, _>>()?;
        }
        policy.validate().map_err(CliError::Usage)
    }
}

/// Apply `TYPE=FIELD,...` options (`--refs`, `--fields`) to `into`; `TYPE=` alone removes
/// TYPE.
fn type_fields<T: TryFrom<String, Error: std::fmt::Display>>(
    flag: &str,
    given: &[String],
    into: &mut std::collections::BTreeMap<TypeName, Vec<T>>,
) -> Result<(), CliError> {
    for r in given {
        let (ty, fields) = r
            .split_once('=')
            .ok_or_else(|| CliError::Usage(format!("{flag} {r:?}: expected TYPE=FIELD,...")))?;
        let ty =
            TypeName::new(ty.trim()).map_err(|e| CliError::Usage(format!("{flag} {r:?}: {e}")))?;
        let fields: Vec<T> = fields
            .split(',')
            .map(str::trim)
            .filter(|f| !f.is_empty())
            .map(|f| {
                T::try_from(f.to_string())
                    .map_err(|e| CliError::Usage(format!("{flag} {r:?}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        if fields.is_empty() {
            into.remove(&ty);
        } else {
            into.insert(ty, fields);
        }
    }
    Ok(())
}

/// Why a command failed; each says what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("no home directory given: pass --home DIR or set TIDESYNC_HOME")]
    NoHome,
    #[error("{0}")]
    Usage(String),
    #[error("{home} already holds a tidesync node ({file} exists); choose another --home")]
    AlreadyInitialised { home: PathBuf, file: PathBuf },
    #[error("cannot create {dir}: {source}")]
    CreateHome {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Token(#[from] crate::api::token::TokenError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot write to standard output: {0}")]
    Output(std::io::Error),
    #[error("demo failed: {0}")]
    Demo(crate::demo::DemoError),
    /// The command ran and found a problem it reports (rotted files).
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Client(e) => e.exit_code(),
            CliError::NoHome | CliError::Usage(_) => 2,
            _ => 1,
        }
    }
}

/// Parse arguments, run the command, print any error, and give the exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_log = if matches!(cli.command, Command::Run) {
        "info"
    } else {
        "warn"
    };
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| default_log.into());
    let mut filter = tracing_subscriber::EnvFilter::builder()
        .parse(&directives)
        .unwrap_or_else(|e| {
            eprintln!("warning: RUST_LOG={directives:?} is not a valid filter ({e}); using {default_log:?}");
            tracing_subscriber::EnvFilter::new(default_log)
        });
    // Automerge opens an info span, with its fields formatted, for every column it parses:
    // about 5% of a large sync's CPU. It is quiet unless RUST_LOG names it.
    if !directives.contains("automerge")
        && let Ok(quiet) = "automerge=warn".parse()
    {
        filter = filter.add_directive(quiet);
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Run one parsed command.
pub fn run(cli: Cli) -> Result<(), CliError> {
    if matches!(cli.command, Command::Demo) {
        return crate::demo::run().map_err(CliError::Demo);
    }
    let home = Home::new(cli.home.ok_or(CliError::NoHome)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)?;
    match cli.command {
        Command::Init {
            name,
            listen,
            api,
            api_hosts,
            mdns,
        } => init(&home, name, listen, api, api_hosts, mdns),
        Command::Run => runtime
            .block_on(crate::daemon::run(&home))
            .map_err(Into::into),
        Command::Id => {
            let identity = Identity::load(&home.key())?;
            println!("{}", identity.node_id());
            Ok(())
        }
        command => runtime.block_on(object_command(&home, command)),
    }
}

fn parse_names(ty: String, id: String) -> Result<(TypeName, ObjectId), CliError> {
    let ty = TypeName::new(ty).map_err(|e| CliError::Usage(e.to_string()))?;
    let id = ObjectId::new(id).map_err(|e| CliError::Usage(e.to_string()))?;
    Ok((ty, id))
}
