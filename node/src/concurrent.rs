//! Fields with concurrent values: finding them in a document (for the conflicts inbox and
//! its index) and the write that resolves one by picking a value.
//!
//! When two nodes write one field without seeing each other's write, Automerge keeps both
//! values and shows one winner, the same on every node. Such a field is listed by its
//! **path**: the JSON Pointer (RFC 6901) of the field without its leading `/`, so a top-level
//! field is just its name (`status`), a nested one `meta/lab`, a list item `steps/2`
//! (`~` is written `~0` and `/` `~1`). Each value is named by its **value id**, the
//! Automerge id of the operation that wrote it (`counter@actor`), which every node holding
//! the change sees alike. Resolving writes the picked value again at the path: an ordinary
//! change whose operation supersedes every concurrent value, so it syncs like any other.

use automerge::transaction::Transactable;
use automerge::{Automerge, ObjId, ObjType, Prop, ROOT, ReadDoc, Value};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::doc::{MAX_JSON_DEPTH, RESERVED_PREFIX};

/// Most fields with concurrent values listed for one object; the count is exact beyond it.
pub const MAX_LISTED_FIELDS_PER_OBJECT: usize = 64;
/// Longest path accepted by a resolution, in bytes.
pub const MAX_PATH_BYTES: usize = 4096;

/// One field with concurrent values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConcurrentField {
    /// The field's path (see the module documentation).
    pub path: String,
    /// Every value, the one reads show first.
    pub values: Vec<ConcurrentValue>,
}

/// One of a field's concurrent values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConcurrentValue {
    /// The value id to pick it by.
    pub id: String,
    pub value: Json,
    /// The node whose change wrote it (its PeerId), when the actor names one.
    pub author: Option<String>,
    /// When that change was made, Unix milliseconds (the change's own time, in seconds).
    pub time_ms: Option<i64>,
    /// Whether reads show this value.
    pub winner: bool,
}

/// Why a resolution could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("the path {0:?} is malformed (a field name, or a JSON Pointer such as meta/lab)")]
    BadPath(String),
    #[error("the object has no field at {0:?}")]
    NoField(String),
    #[error("the field {path:?} has one value only; there is nothing to resolve")]
    NotConcurrent { path: String },
    #[error("the field {path:?} has no concurrent value {pick:?} (see `tidesync conflicts`)")]
    NoValue { path: String, pick: String },
    #[error("automerge refused the write: {0}")]
    Automerge(#[from] automerge::AutomergeError),
}

/// The objects a walk visits: an object's id, and its path so far.
type Pending = (ObjId, Vec<Prop>);

/// Every value at `obj[prop]`. Automerge 0.12 asserts inside `get_all` that its op ids sort
/// alike, which a hostile peer's actor ids can break; such a field is read as having none
/// rather than panic.
fn values_at<'a>(doc: &'a impl ReadDoc, obj: &ObjId, prop: Prop) -> Vec<(Value<'a>, ObjId)> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| doc.get_all(obj, prop)))
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default()
}

/// Walk the document's fields (not its reserved keys), calling `found` with the path and the
/// values of each field holding more than one. Descends into the winning value only, to at
/// most [`MAX_JSON_DEPTH`] levels; stops when `found` returns false.
fn walk(doc: &impl ReadDoc, mut found: impl FnMut(&[Prop], Vec<(Value<'_>, ObjId)>) -> bool) {
    let mut stack: Vec<Pending> = vec![(ROOT, Vec::new())];
    while let Some((obj, path)) = stack.pop() {
        let props: Vec<Prop> = match doc.object_type(&obj) {
            Ok(ObjType::Map | ObjType::Table) => doc
                .keys(&obj)
                .filter(|k| !(path.is_empty() && k.starts_with(RESERVED_PREFIX)))
                .map(Prop::Map)
                .collect(),
            Ok(ObjType::List) => (0..doc.length(&obj)).map(Prop::Seq).collect(),
            _ => continue,
        };
        for prop in props {
            let values = values_at(doc, &obj, prop.clone());
            let mut here = path.clone();
            here.push(prop);
            if let Some((Value::Object(ObjType::Map | ObjType::Table | ObjType::List), child)) =
                values.first()
                && here.len() < MAX_JSON_DEPTH
            {
                stack.push((child.clone(), here.clone()));
            }
            if values.len() > 1 && !found(&here, values) {
                return;
            }
        }
    }
}

/// Whether the document's history is a line: each change depends on exactly the one before
/// it. No two changes are then concurrent, so no field can hold concurrent values and the
/// walk in [`count`] can be skipped. Any other history (or one Automerge cannot list) is not.
pub fn linear(doc: &Automerge) -> bool {
    let Ok(changes) =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| doc.get_changes_meta(&[])))
    else {
        return false;
    };
    changes.first().is_some_and(|first| first.deps.is_empty())
        && changes
            .windows(2)
            .all(|pair| pair[1].deps.as_slice() == [pair[0].hash])
}

/// How many fields of the document hold concurrent values (kept in the store's index).
pub fn count(doc: &impl ReadDoc) -> u32 {
    let mut n = 0u32;
    walk(doc, |_, _| {
        n = n.saturating_add(1);
        true
    });
    n
}

/// The fields of the document holding concurrent values, at most
/// [`MAX_LISTED_FIELDS_PER_OBJECT`], each with its values, their authors and times.
pub fn list(doc: &Automerge) -> Vec<ConcurrentField> {
    let mut raw: Vec<(String, Vec<(Json, ObjId)>)> = Vec::new();
    walk(doc, |path, values| {
        let values = values
            .into_iter()
            .map(|(v, id)| (crate::doc::value_json(doc, v, &id), id))
            .collect();
        raw.push((pointer(path), values));
        raw.len() < MAX_LISTED_FIELDS_PER_OBJECT
    });
    if raw.is_empty() {
        return Vec::new();
    }
    let changes =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| doc.get_changes_meta(&[])))
            .unwrap_or_default();
    let made = |id: &ObjId| -> (Option<String>, Option<i64>) {
        let automerge::ObjId::Id(counter, actor, _) = id else {
            return (None, None);
        };
        let author = actor
            .to_bytes()
            .get(..32)
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
            .map(|k| tidesync_proto::NodeId(k).to_string());
        let time = changes
            .iter()
            .find(|c| *c.actor == *actor && c.start_op <= *counter && *counter <= c.max_op)
            .map(|c| c.timestamp.saturating_mul(1000));
        (author, time)
    };
    raw.into_iter()
        .map(|(path, values)| ConcurrentField {
            path,
            values: values
                .into_iter()
                .enumerate()
                .map(|(i, (value, id))| {
                    let (author, time_ms) = made(&id);
                    ConcurrentValue {
                        id: id.to_string(),
                        value,
                        author,
                        time_ms,
                        winner: i == 0,
                    }
                })
                .collect(),
        })
        .collect()
}

/// Write the value `pick` of the field at `path` again, superseding every concurrent value.
pub fn resolve<T: Transactable + ReadDoc>(
    tx: &mut T,
    path: &str,
    pick: &str,
) -> Result<(), ResolveError> {
    let props = parse_pointer(path)?;
    let Some((last, parents)) = props.split_last() else {
        return Err(ResolveError::BadPath(path.to_string()));
    };
    let mut obj = ROOT;
    for prop in parents {
        obj = match tx.get(&obj, prop.clone())? {
            Some((Value::Object(_), child)) => child,
            _ => return Err(ResolveError::NoField(path.to_string())),
        };
    }
    let values = values_at(tx, &obj, last.clone());
    if values.is_empty() {
        return Err(ResolveError::NoField(path.to_string()));
    }
    if values.len() < 2 {
        return Err(ResolveError::NotConcurrent {
            path: path.to_string(),
        });
    }
    let Some((value, id)) = values.into_iter().find(|(_, id)| id.to_string() == pick) else {
        return Err(ResolveError::NoValue {
            path: path.to_string(),
            pick: pick.to_string(),
        });
    };
    let json = crate::doc::value_json(tx, value, &id);
    crate::doc::write_value(tx, &obj, last.clone(), &json)?;
    Ok(())
}

/// A path as listed: JSON Pointer segments without the leading `/`.
fn pointer(path: &[Prop]) -> String {
    path.iter()
        .map(|p| match p {
            Prop::Map(k) => k.replace('~', "~0").replace('/', "~1"),
            Prop::Seq(i) => i.to_string(),
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Parse a listed path (a leading `/` is allowed). A segment of digits is a list index when
/// its parent is a list; the resolution checks the document, so it is tried as both.
fn parse_pointer(path: &str) -> Result<Vec<Prop>, ResolveError> {
    let bad = || ResolveError::BadPath(path.to_string());
    if path.is_empty() || path.len() > MAX_PATH_BYTES {
        return Err(bad());
    }
    let body = path.strip_prefix('/').unwrap_or(path);
    let segments: Vec<&str> = body.split('/').collect();
    if segments.len() > MAX_JSON_DEPTH || segments[0].starts_with(RESERVED_PREFIX) {
        return Err(bad());
    }
    segments
        .into_iter()
        .map(|s| {
            if s.is_empty() {
                return Err(bad());
            }
            match s.parse::<usize>() {
                Ok(i) if s == i.to_string() => Ok(Prop::Seq(i)),
                _ => Ok(Prop::Map(s.replace("~1", "/").replace("~0", "~"))),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::ActorId;
    use automerge::transaction::CommitOptions;

    fn actor(n: u8) -> ActorId {
        let mut bytes = [n; 40];
        bytes[32..].copy_from_slice(&7u64.to_be_bytes());
        ActorId::from(bytes.to_vec())
    }

    /// Two documents that wrote `status` (and `meta/lab`) concurrently, merged.
    fn concurrent() -> Automerge {
        let mut a = Automerge::new().with_actor(actor(1));
        let mut tx = a.transaction();
        tx.put(ROOT, "status", "new").unwrap();
        let meta = tx.put_object(ROOT, "meta", ObjType::Map).unwrap();
        tx.put(&meta, "lab", "A").unwrap();
        tx.put(ROOT, "same", 1).unwrap();
        tx.commit_with(CommitOptions::default().with_time(1_000));
        let mut b = a.fork().with_actor(actor(2));
        for (doc, status, lab, t) in [
            (&mut a, "done", "A1", 2_000),
            (&mut b, "failed", "B1", 3_000),
        ] {
            let mut tx = doc.transaction();
            tx.put(ROOT, "status", status).unwrap();
            let meta = tx.get(ROOT, "meta").unwrap().unwrap().1;
            tx.put(&meta, "lab", lab).unwrap();
            tx.commit_with(CommitOptions::default().with_time(t));
        }
        a.merge(&mut b).unwrap();
        a
    }

    #[test]
    fn lists_every_concurrent_field_with_authors_and_times() {
        let doc = concurrent();
        assert_eq!(count(&doc), 2);
        let mut fields = list(&doc);
        fields.sort_by(|x, y| x.path.cmp(&y.path));
        assert_eq!(fields[0].path, "meta/lab");
        assert_eq!(fields[1].path, "status");
        let status = &fields[1];
        let mut values: Vec<_> = status.values.iter().map(|v| v.value.clone()).collect();
        values.sort_by_key(|v| v.to_string());
        assert_eq!(values, vec![Json::from("done"), Json::from("failed")]);
        assert_eq!(status.values.iter().filter(|v| v.winner).count(), 1);
        let times: Vec<_> = status.values.iter().map(|v| v.time_ms).collect();
        assert!(times.contains(&Some(2_000_000)) && times.contains(&Some(3_000_000)));
        let authors: Vec<_> = status.values.iter().map(|v| v.author.clone()).collect();
        assert_eq!(
            authors
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            2
        );
        assert!(authors.contains(&Some(tidesync_proto::NodeId([1; 32]).to_string())));
    }

    #[test]
    fn resolving_picks_the_value_even_the_loser_and_both_sides_agree() {
        for pick_winner in [true, false] {
            let mut doc = concurrent();
            let field = list(&doc).into_iter().find(|f| f.path == "status").unwrap();
            let picked = field
                .values
                .iter()
                .find(|v| v.winner == pick_winner)
                .unwrap()
                .clone();
            let mut other = doc.fork().with_actor(actor(3));
            let mut tx = doc.transaction();
            resolve(&mut tx, "status", &picked.id).unwrap();
            tx.commit();
            assert_eq!(
                doc.get(ROOT, "status").unwrap().unwrap().0.to_string(),
                format!("{}", picked.value)
            );
            assert_eq!(count(&doc), 1, "meta/lab is still concurrent");
            other.merge(&mut doc).unwrap();
            assert_eq!(count(&other), 1);
            let mut tx = other.transaction();
            let lab = list(&doc).remove(0);
            resolve(&mut tx, "/meta/lab", &lab.values[1].id).unwrap();
            tx.commit();
            assert_eq!(count(&other), 0);
        }
    }

    #[test]
    fn resolving_refuses_what_is_not_there() {
        let mut doc = concurrent();
        let mut tx = doc.transaction();
        for (path, pick) in [("", "1@00"), ("@deleted", "1@00"), ("a//b", "1@00")] {
            assert!(
                matches!(resolve(&mut tx, path, pick), Err(ResolveError::BadPath(_))),
                "{path}"
            );
        }
        assert!(matches!(
            resolve(&mut tx, "nope", "1@00"),
            Err(ResolveError::NoField(_))
        ));
        assert!(matches!(
            resolve(&mut tx, "same", "1@00"),
            Err(ResolveError::NotConcurrent { .. })
        ));
        assert!(matches!(
            resolve(&mut tx, "status", "1@00"),
            Err(ResolveError::NoValue { .. })
        ));
        assert!(matches!(
            resolve(&mut tx, &"x/".repeat(40), "1@00"),
            Err(ResolveError::BadPath(_))
        ));
    }

    #[test]
    fn a_line_of_changes_has_no_concurrent_values_and_a_fork_is_not_a_line() {
        let mut a = Automerge::new().with_actor(actor(1));
        let mut tx = a.transaction();
        tx.put(ROOT, "x", 1).unwrap();
        tx.commit();
        let mut tx = a.transaction();
        tx.put(ROOT, "x", 2).unwrap();
        tx.commit();
        assert!(linear(&a) && count(&a) == 0);
        // A second actor that edits after the first, without overlap, keeps the line.
        let mut b = a.fork().with_actor(actor(2));
        let mut tx = b.transaction();
        tx.put(ROOT, "x", 3).unwrap();
        tx.commit();
        a.merge(&mut b).unwrap();
        assert!(linear(&a) && count(&a) == 0);
        let doc = concurrent();
        assert!(!linear(&doc) && count(&doc) > 0);
    }

    #[test]
    fn paths_round_trip_through_their_escapes() {
        let props = vec![
            Prop::Map("a/b~c".into()),
            Prop::Seq(3),
            Prop::Map("07".into()),
        ];
        let p = pointer(&props);
        assert_eq!(p, "a~1b~0c/3/07");
        assert_eq!(parse_pointer(&p).unwrap(), props);
    }
}
