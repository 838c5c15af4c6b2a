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
        let time = u64::try_from(c.time)
            .ok()
            .map(|t| {
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(t),
                )
                .to_string()
            })
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
    ms.and_then(|ms| u64::try_from(ms).ok())
        .map(|ms| {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
            )
            .to_string()
        })
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
            format!(
                "connected since {}{synced}",
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
    print_peers(&s.peers);
}
