//! How the CLI prints histories, peers and status for people (`--json` prints the API's JSON).

use super::*;

pub(super) fn print_history(h: &History) {
    println!(
        "{}/{}  doc {}  origin {}{}",
        h.ty,
        h.id,
        h.doc,
        h.origin,
        if h.deleted { "  (deleted)" } else { "" }
    );
    for c in &h.changes {
        let time = c
            .time
            .checked_mul(1000)
            .and_then(crate::when::rfc3339_ms)
            .unwrap_or_else(|| c.time.to_string());
        let verdict = if c.verified {
            "signature verified".to_string()
        } else {
            format!(
                "SIGNATURE INVALID: {}",
                c.error.as_deref().unwrap_or("unknown")
            )
        };
        println!(
            "{time}  {author}  {hash}  {message:<6}  {verdict}",
            author = c.author,
            hash = &c.hash[..16.min(c.hash.len())],
            message = c.message.as_deref().unwrap_or("-"),
        );
    }
}

fn format_ms(ms: Option<i64>) -> String {
    ms.map(crate::when::rfc3339_or_number)
        .unwrap_or_else(|| "never".into())
}

pub(super) fn print_peers(peers: &[crate::core::PeerStatus]) {
    if peers.is_empty() {
        println!("no peers configured (add one with `tidesync peer add`)");
    }
    for p in peers {
        let state = if p.connected {
            let synced = match p.in_sync_after_ms {
                Some(ms) => format!(", in sync after {ms} ms"),
                None => ", catching up".to_string(),
            };
            let via = p
                .via
                .as_deref()
                .map(|v| format!(" over {v}"))
                .unwrap_or_default();
            format!(
                "connected{via} since {}{synced}",
                format_ms(p.connected_since_ms)
            )
        } else {
            "not connected".to_string()
        };
        println!("{}  {}  {}", p.name, p.id, state);
        println!(
            "    addrs: {}  last sync: {}  pending: {} out, {} in  changes: {} in, {} out  rejected: {} from them, {} by them",
            if p.addrs.is_empty() {
                "-".to_string()
            } else {
                p.addrs.join(" ")
            },
            format_ms(p.last_sync_ms),
            p.pending_out,
            p.pending_in,
            p.changes_in,
            p.changes_out,
            p.rejected,
            p.rejected_by_peer
        );
        let policy = toml::to_string(&p.policy).unwrap_or_default();
        let policy = policy.trim().replace('\n', "  ");
        println!(
            "    policy: {}",
            if policy.is_empty() {
                "everything, both ways".to_string()
            } else {
                policy
            }
        );
        if !p.rejected_types.is_empty() {
            let by_type: Vec<String> = p
                .rejected_types
                .iter()
                .map(|(t, n)| format!("{t} {n}"))
                .collect();
            println!("    refused by policy: {}", by_type.join(", "));
        }
    }
}

pub(super) fn print_status(s: &Status) {
    println!("node:    {}", s.node);
    println!("name:    {}", s.name);
    println!("running: {}", if s.running { "yes" } else { "no" });
    println!(
        "store:   {} bytes, last change SEQ {}",
        s.store_bytes, s.last_seq
    );
    if s.objects.is_empty() {
        println!("objects: none");
    }
    for (ty, c) in &s.objects {
        println!("objects: {ty}: {} live, {} deleted", c.live, c.deleted);
    }
    if s.held_changes > 0 {
        println!(
            "held:    {} changes waiting for their dependencies",
            s.held_changes
        );
    }
    if s.collisions > 0 {
        println!(
            "conflicts: {} objects kept under their own name because another object had their type and id here (see `tidesync conflicts`)",
            s.collisions
        );
    }
    if s.equivocations > 0 {
        println!(
            "equivocations: {} (by {}): changes signed twice with one actor and sequence number; {} changes refused (see `tidesync conflicts`)",
            s.equivocations,
            s.equivocators.join(", "),
            s.refused_for_equivocation
        );
    }
    for addr in &s.listen {
        println!("listen:  {addr}");
    }
    if s.refused_connections > 0 {
        println!(
            "refused: {} incoming connections (from unconfigured peers, or over the connection limits)",
            s.refused_connections
        );
    }
    if s.discovered_peers + s.discovered_strangers > 0 {
        println!(
            "mDNS:    found {} configured peers and {} other nodes (never dialled)",
            s.discovered_peers, s.discovered_strangers
        );
    }
    print_peers(&s.peers);
}

use crate::when::rfc3339_or_number as when;

/// The conflicts inbox, one paragraph per item.
pub(super) fn print_conflicts(conflicts: &[crate::core::Conflict]) {
    if conflicts.is_empty() {
        println!(
            "the inbox is empty: no concurrent values, name collisions, equivocations, refused or held changes, or missing files"
        );
    }
    for c in conflicts {
        if !c.fields.is_empty() {
            println!(
                "{}/{} ({}): fields written concurrently:",
                c.ty, c.local_id, c.doc
            );
            for f in &c.fields {
                println!("  {}:", f.path);
                for v in &f.values {
                    println!(
                        "    {} {}  by {}{}{}",
                        if v.winner { "*" } else { " " },
                        v.value,
                        v.author.as_deref().unwrap_or("an unknown actor"),
                        v.time_ms
                            .map(|t| format!(" at {}", when(t)))
                            .unwrap_or_default(),
                        format_args!("  (value id {})", v.id)
                    );
                }
            }
            println!(
                "  (* is the value reads show; keep one with `tidesync resolve {} {} PATH --pick VALUE_ID`)",
                c.ty, c.local_id
            );
            continue;
        }
        if let Some(r) = &c.refusal {
            println!(
                "refused {}/{} from {} at {}: {} ({})",
                c.ty,
                c.id,
                r.peer,
                when(r.time_ms),
                r.reason,
                r.rule
            );
            continue;
        }
        if let Some(h) = &c.held {
            println!(
                "held {}/{}: {} changes from {} since {}, waiting for {}",
                c.ty,
                c.id,
                h.changes,
                h.from.join(", "),
                when(h.since_ms),
                if h.waiting_for.is_empty() {
                    "nothing missing (released at the next batch)".to_string()
                } else {
                    h.waiting_for.join(", ")
                }
            );
            continue;
        }
        if let Some(f) = &c.file {
            println!(
                "file {} ({} bytes, {} of {} segments): {}",
                f.hash, f.size, f.segments_done, f.segments, f.why
            );
            continue;
        }
        if let Some(e) = &c.equivocation {
            println!(
                "equivocation in {}/{} ({}): {} signed two changes as actor {} seq {}: {} and {}; both are refused with what depends on them",
                c.ty, c.local_id, c.doc, e.author, e.actor, e.seq, e.first, e.second
            );
            continue;
        }
        if c.kind == "replaced-by-view" {
            println!(
                "{}/{}: its publisher {} now shares only a view of it, which has the name; the full object this node held before ({}) is kept as {}/{}",
                c.ty, c.id, c.origin, c.doc, c.ty, c.local_id
            );
            continue;
        }
        println!(
            "{}/{}: {} (origin {}) is here as {}/{}; {}/{} is {} (origin {})",
            c.ty,
            c.id,
            c.doc,
            c.origin,
            c.ty,
            c.local_id,
            c.ty,
            c.id,
            c.holder.as_deref().unwrap_or("-"),
            c.holder_origin.as_deref().unwrap_or("-"),
        );
        println!(
            "  (rename one of them here with `tidesync rename {} {} NEW_ID`; names are local)",
            c.ty, c.local_id
        );
    }
}

/// The fleet, one paragraph per node.
pub(super) fn print_fleet(fleet: &[crate::reads::FleetNode]) {
    if fleet.is_empty() {
        println!("no other node heard of yet");
    }
    let now = crate::replica::system_now_ms();
    let age = |ms: i64| {
        humantime::format_duration(std::time::Duration::from_secs(
            (now.saturating_sub(ms) / 1000).max(0) as u64,
        ))
        .to_string()
    };
    for n in fleet {
        println!("{} ({}, fingerprint {})", n.name, n.id, n.fingerprint);
        match &n.record {
            Some(r) => {
                println!(
                    "  status as of {} ago (heard {} ago): version {}, {} objects, {} bytes, {} held, {} refused, {} files wanted, {} concurrent fields",
                    age(r.made_ms),
                    age(n.heard_ms.unwrap_or(r.made_ms)),
                    r.version,
                    r.objects,
                    r.store_bytes,
                    r.held_changes,
                    r.refusals,
                    r.files_wanted,
                    r.concurrent_fields
                );
                for p in &r.peers {
                    println!(
                        "    peer {}: {}, lag {} out / {} in, last sync {}",
                        p.name,
                        if p.connected { "online" } else { "offline" },
                        p.lag_out,
                        p.lag_in,
                        p.last_sync_ms
                            .map(|t| format!("{} ago", age(t)))
                            .unwrap_or_else(|| "never".into())
                    );
                }
            }
            None => println!("  no status record"),
        }
        if let Some(b) = n.bundle_ms {
            println!("  last bundle received {} ago", age(b));
        }
    }
}

/// A plan (see [`crate::core::Plan`]) for people.
pub(super) fn print_plan(p: &crate::core::Plan) {
    let from = if p.after == 0 {
        "all of our log".to_string()
    } else {
        format!("our log after {}", p.after)
    };
    println!("plan for {} ({from}, up to {}):", p.peer, p.tip);
    println!(
        "  records: {} changes of {} objects in {} batches, {} bytes on the wire ({} before compression)",
        p.changes, p.objects, p.batches, p.bytes, p.plain_bytes
    );
    for (ty, t) in &p.types {
        println!(
            "    {ty}: {} changes, {} bytes before compression",
            t.changes, t.bytes
        );
    }
    if p.views > 0 {
        println!(
            "  views: {} objects cross as views (not counted above)",
            p.views
        );
    }
    if p.oversized > 0 {
        println!(
            "  {} changes are too large for any frame and never cross",
            p.oversized
        );
    }
    println!(
        "  files: at most {} files, {} bytes (those the peer lacks){}",
        p.files,
        p.file_bytes,
        if p.files_not_here > 0 {
            format!("; {} more are not held here", p.files_not_here)
        } else {
            String::new()
        }
    );
    println!("  total: {} bytes", p.total_bytes());
    match p.send_secs {
        Some(secs) => println!(
            "  at max-rate {} bytes/s: {} of sending",
            p.link.max_rate.unwrap_or(0),
            humantime::format_duration(std::time::Duration::from_secs(secs))
        ),
        None => println!("  no max-rate: as fast as the link goes"),
    }
    let zone = p
        .link
        .zone
        .clone()
        .map_or_else(|| "UTC".to_string(), String::from);
    if !p.link.windows.is_empty() {
        let windows: Vec<String> = p.link.windows.iter().map(|w| String::from(*w)).collect();
        println!(
            "  windows ({zone}): {} ({} minutes a day)",
            windows.join(", "),
            p.link.open_minutes_per_day()
        );
    }
    if let Some(budget) = p.link.budget {
        println!(
            "  budget: {budget} bytes a day, {} sent today",
            p.sent_today
        );
    }
    if let Some(days) = p.days {
        println!(
            "  takes {days} day{} ({zone}) under the windows and the budget, today counted",
            if days == 1 { "" } else { "s" }
        );
    }
    if let Some(why) = p.held_back {
        println!("  now: held back: {why}");
    }
}
