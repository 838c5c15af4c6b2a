//! What each command does once parsed: through the running node's API, or on the store when
//! no node runs (see [`crate::client`]).

use super::print::{print_conflicts, print_fleet, print_history, print_peers, print_status};
use super::*;

/// Operations of fewer changes than this show no progress bar.
pub const PROGRESS_MIN_CHANGES: u64 = 2_000;

/// A progress bar on standard error, drawn only on a terminal and only once the count passes
/// `PROGRESS_MIN_CHANGES`, so small bundles draw nothing.
struct Progress {
    bar: indicatif::ProgressBar,
    shown: std::cell::Cell<bool>,
}

impl Progress {
    /// A bar for `what`; `counted` when the total is known (it is set by `update`).
    fn new(counted: bool, what: &'static str) -> Progress {
        let bar = indicatif::ProgressBar::with_draw_target(
            counted.then_some(0),
            indicatif::ProgressDrawTarget::hidden(),
        );
        let template = if counted {
            "{bar:40} {pos}/{len} {msg} ({eta} left)"
        } else {
            "{spinner} {pos} {msg}"
        };
        if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
            bar.set_style(style);
        }
        bar.set_message(what);
        Progress {
            bar,
            shown: std::cell::Cell::new(false),
        }
    }

    fn update(&self, done: u64, total: Option<u64>) {
        if !self.shown.get() && total.unwrap_or(done) >= PROGRESS_MIN_CHANGES {
            self.bar
                .set_draw_target(indicatif::ProgressDrawTarget::stderr());
            self.shown.set(true);
        }
        if let Some(total) = total {
            self.bar.set_length(total);
        }
        self.bar.set_position(done);
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// `plan --for PEER` and `export --plan`: what would cross, as text or JSON.
async fn show_plan(
    client: &mut Client,
    peer: &str,
    all: bool,
    files: bool,
    json: bool,
) -> Result<(), CliError> {
    let plan = client.plan(peer, all).await?;
    let plan = if files { plan } else { plan.without_files() };
    if json {
        return print_json(&plan);
    }
    super::print::print_plan(&plan);
    Ok(())
}

pub(super) fn print_json(v: &impl serde::Serialize) -> Result<(), CliError> {
    let line = serde_json::to_string(v).map_err(|e| CliError::Output(std::io::Error::other(e)))?;
    println!("{line}");
    Ok(())
}

pub(super) async fn object_command(home: &Home, command: Command) -> Result<(), CliError> {
    let mut client = Client::connect(home)?;
    match command {
        Command::File { action } => match action {
            FileAction::Add { path } => print_json(&client.add_file(&path).await?),
            FileAction::Get { hash, out } => {
                let hash: crate::files::FileHash = hash
                    .parse()
                    .map_err(|e: crate::files::FileRefError| CliError::Usage(e.to_string()))?;
                let size = client.get_file(&hash, &out).await?;
                eprintln!("wrote {size} bytes to {}", out.display());
                Ok(())
            }
            FileAction::Verify { json } => {
                let report = client.verify_files().await?;
                if json {
                    return print_json(&report);
                }
                println!(
                    "{} files checked, {} rotted",
                    report.checked,
                    report.rotted.len()
                );
                for h in &report.rotted {
                    let again = if report.refetching.contains(h) {
                        "removed; fetching it again"
                    } else {
                        "removed; nothing refers to it"
                    };
                    println!("rotted {h}: {again}");
                }
                if report.rotted.is_empty() {
                    Ok(())
                } else {
                    Err(CliError::Failed(format!(
                        "{} stored files had rotted",
                        report.rotted.len()
                    )))
                }
            }
            FileAction::Gc { grace, json } => {
                let report = client.gc_files(grace).await?;
                if json {
                    return print_json(&report);
                }
                println!(
                    "removed {} files ({} bytes); kept {} recent unreferenced files",
                    report.removed.len(),
                    report.freed_bytes,
                    report.kept_recent
                );
                Ok(())
            }
            FileAction::Ls {
                json,
                missing: true,
            } => {
                let files = client.missing_files().await?;
                if json {
                    return print_json(&files);
                }
                for f in &files {
                    let error = f.last_error.as_deref().unwrap_or("");
                    println!(
                        "{} {} {}/{} segments from {} {error}",
                        f.hash,
                        f.size,
                        f.segments_done,
                        f.segments,
                        f.sources.join(",")
                    );
                }
                Ok(())
            }
            FileAction::Ls {
                json,
                missing: false,
            } => {
                let files = client.files().await?;
                if json {
                    return print_json(&files);
                }
                for f in &files {
                    println!("{} {}", f.hash, f.size);
                }
                Ok(())
            }
        },
        Command::Put {
            ty,
            id,
            json,
            files,
        } => {
            let (ty, id) = parse_names(ty, id)?;
            let body = if json == "-" {
                let mut s = String::new();
                std::io::stdin().read_to_string(&mut s).map_err(|e| {
                    CliError::Usage(format!("cannot read the object from standard input: {e}"))
                })?;
                s
            } else {
                json
            };
            let mut fields = crate::api::parse_fields(body.as_bytes()).map_err(CliError::Usage)?;
            for spec in files {
                let Some((field, path)) = spec.split_once('=') else {
                    return Err(CliError::Usage(format!(
                        "--file takes FIELD=PATH, not {spec:?}"
                    )));
                };
                let path = std::path::Path::new(path);
                let stored = client.add_file(path).await?;
                let hash = stored
                    .hash
                    .parse()
                    .map_err(|e: crate::files::FileRefError| CliError::Usage(e.to_string()))?;
                let reference = crate::files::FileRef {
                    hash,
                    size: stored.size,
                    name: path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .filter(|n| n.len() <= crate::files::MAX_FILE_NAME_BYTES),
                    media_type: crate::files::media_type(path).map(str::to_string),
                };
                fields.insert(field.to_string(), reference.to_json());
            }
            print_json(&client.put(&ty, &id, fields).await?)
        }
        Command::Get { ty, id } => {
            let (ty, id) = parse_names(ty, id)?;
            print_json(&client.get(&ty, &id).await?)
        }
        Command::Rm { ty, id } => {
            let (ty, id) = parse_names(ty, id)?;
            print_json(&client.delete(&ty, &id).await?)
        }
        Command::Ls { ty } => {
            let ty = TypeName::new(ty).map_err(|e| CliError::Usage(e.to_string()))?;
            let mut after: Option<String> = None;
            loop {
                let page = client.list(&ty, after.as_deref(), LS_PAGE_IDS).await?;
                for id in &page.ids {
                    println!("{id}");
                }
                match page.next {
                    Some(next) => after = Some(next),
                    None => return Ok(()),
                }
            }
        }
        Command::History { ty, id, json } => {
            let (ty, id) = parse_names(ty, id)?;
            let history = client.history(&ty, &id).await?;
            if json {
                print_json(&history)
            } else {
                print_history(&history);
                Ok(())
            }
        }
        Command::Changes { since, limit, wait } => {
            let feed = client.changes(since, limit, wait).await?;
            for change in &feed.changes {
                print_json(change)?;
            }
            Ok(())
        }
        Command::Export {
            peer,
            out,
            plan,
            all,
            plain,
            files: _,
            no_files,
            json,
        } => {
            let out = match (plan, out) {
                (false, Some(out)) => out,
                _ => return show_plan(&mut client, &peer, all, !no_files, json).await,
            };
            let bar = Progress::new(false, "changes gathered");
            let tick = |n: u64| bar.update(n, None);
            let report = client
                .export_bundle(&peer, all, !plain, !no_files, &out, &tick)
                .await?;
            bar.finish();
            if json {
                return print_json(&report);
            }
            println!(
                "wrote {}: {} changes of {} objects and {} files ({} bytes) for {} (log {}..{}), asking it for {} files; {} bytes, {}",
                out.display(),
                report.changes,
                report.documents,
                report.files,
                report.file_bytes,
                report.peer,
                report.after,
                report.upto,
                report.wants,
                report.bytes,
                if report.encrypted {
                    "encrypted to the peer's key"
                } else {
                    "NOT encrypted"
                }
            );
            Ok(())
        }
        Command::Import {
            file,
            dry_run,
            json,
        } => {
            let bar = Progress::new(true, "changes stored");
            let tick = |done: u64, total: u64| bar.update(done, Some(total));
            let report = client.import_bundle(&file, dry_run, &tick).await?;
            bar.finish();
            if json {
                return print_json(&report);
            }
            println!(
                "{}{}: {} objects added, {} updated; {} new changes ({} waiting for earlier ones), {} already here, {} rejected; {} of its {} files stored ({} bytes)",
                if report.dry_run {
                    "dry run, nothing written: "
                } else {
                    ""
                },
                file.display(),
                report.added,
                report.updated,
                report.new_changes,
                report.held,
                report.duplicates,
                report.rejected,
                report.files_stored,
                report.files,
                report.file_bytes_stored
            );
            Ok(())
        }
        Command::Held {
            peer,
            object,
            json,
            action,
        } => {
            let purge = action.is_some();
            let (peer, object) = match action {
                Some(HeldAction::Purge { peer, object }) => (peer, object),
                None => (peer, object),
            };
            let (ty, id) = match object.as_deref() {
                Some([ty, id]) => (Some(ty.clone()), Some(id.clone())),
                _ => (None, None),
            };
            let query = crate::held::HeldQuery {
                peer,
                ty,
                id,
                purge,
            };
            let report = client.held(&query).await?;
            if json {
                return print_json(&report);
            }
            if let Some(n) = report.removed {
                println!("removed {n} held changes");
                return Ok(());
            }
            for t in &report.tallies {
                println!(
                    "{}: {} held ({} bytes), {} refused for lack of room",
                    t.from, t.changes, t.bytes, t.refused_for_room
                );
            }
            for h in &report.held {
                println!("{}/{} {} from {}", h.ty, h.id, h.hash, h.from);
            }
            if report.held.is_empty() {
                println!("no held changes");
            }
            Ok(())
        }
        Command::Conflicts { json } => {
            let conflicts = client.conflicts().await?;
            if json {
                return print_json(&conflicts);
            }
            print_conflicts(&conflicts);
            Ok(())
        }
        Command::Resolve { ty, id, path, pick } => {
            let (ty, id) = parse_names(ty, id)?;
            print_json(&client.resolve(&ty, &id, &path, &pick).await?)
        }
        Command::Rename { ty, id, to } => {
            let (ty, id) = parse_names(ty, id)?;
            print_json(&client.rename(&ty, &id, &to).await?)
        }
        Command::Fleet { json } => {
            let fleet = client.fleet().await?;
            if json {
                return print_json(&fleet);
            }
            print_fleet(&fleet);
            Ok(())
        }
        Command::Plan { peer, all, json } => show_plan(&mut client, &peer, all, true, json).await,
        Command::Sync { now } => {
            client.sync_now(&now).await?;
            println!("sending to {now} now, until it is in sync");
            Ok(())
        }
        Command::Open => {
            println!("{}", client.login_url().await?);
            Ok(())
        }
        Command::Status { json } => {
            let status = client.status().await?;
            if json {
                print_json(&status)
            } else {
                print_status(&status);
                Ok(())
            }
        }
        Command::Peer { command } => match command {
            PeerCommand::Add {
                name,
                id,
                addrs,
                policy,
            } => {
                let mut p = crate::policy::Policy::default();
                policy.apply(&mut p)?;
                client
                    .set_peer(
                        home,
                        crate::config::PeerConfig {
                            name: name.clone(),
                            id,
                            addrs,
                            policy: p,
                        },
                    )
                    .await?;
                println!("peer {name} configured");
                Ok(())
            }
            PeerCommand::Set {
                name,
                addrs,
                policy,
            } => {
                let config = Config::load(home)?;
                let Some(mut peer) = config.peers.into_iter().find(|p| p.name == name) else {
                    return Err(CliError::Usage(format!(
                        "no peer named {name:?} (see `tidesync peer ls`)"
                    )));
                };
                policy.apply(&mut peer.policy)?;
                if !addrs.is_empty() {
                    peer.addrs = addrs;
                }
                client.set_peer(home, peer).await?;
                println!("peer {name} updated");
                Ok(())
            }
            PeerCommand::Rm { name } => {
                client.remove_peer(home, &name).await?;
                println!("peer {name} removed");
                Ok(())
            }
            PeerCommand::Ls { json } => {
                let status = client.status().await?;
                if json {
                    print_json(&status.peers)
                } else {
                    print_peers(&status.peers);
                    Ok(())
                }
            }
        },
        Command::Init { .. } | Command::Run | Command::Id | Command::Demo => {
            Err(CliError::Usage("not an object command".into()))
        }
    }
}

pub(super) fn init(
    home: &Home,
    name: Option<String>,
    listen: Vec<Multiaddr>,
    api: std::net::SocketAddr,
    hosts: Vec<String>,
    mdns: bool,
) -> Result<(), CliError> {
    for file in [home.config(), home.key(), home.store(), home.token()] {
        if file.exists() {
            return Err(CliError::AlreadyInitialised {
                home: home.dir.clone(),
                file,
            });
        }
    }
    let name = name
        .or_else(|| {
            std::path::absolute(&home.dir)
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        })
        .unwrap_or_else(|| "tidesync".into());
    let config = Config {
        format: CONFIG_FORMAT,
        name,
        listen,
        api: ApiConfig {
            listen: api,
            token: None,
            hosts,
        },
        store: StoreConfig::default(),
        fleet: Default::default(),
        discovery: crate::config::DiscoveryConfig { mdns },
        peers: vec![],
    };
    config.validate().map_err(CliError::Usage)?;
    let create_err = |source| CliError::CreateHome {
        dir: home.dir.clone(),
        source,
    };
    match home.create() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && home.dir.is_dir() => {}
        other => other.map_err(create_err)?,
    }
    let identity = Identity::generate(&mut rand::rng());
    identity.save(&home.key())?;
    crate::api::token::save(&home.token(), &crate::api::token::generate())?;
    config.save(home)?;
    Store::create(&home.store())?;
    // The home (0700 even when it already existed) and the store file (0600).
    home.restrict().map_err(create_err)?;
    println!(
        "initialised node {} ({}) in {}",
        config.name,
        identity.node_id(),
        home.dir.display()
    );
    println!(
        "applications find the API's bearer token in {}",
        home.token().display()
    );
    Ok(())
}
