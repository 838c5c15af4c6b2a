//! How an object's JSON fields map onto an Automerge document, and the deletion tombstone rule.
//!
//! An object is one Automerge document whose root map holds the object's fields. JSON objects
//! become Automerge maps, arrays become lists, strings, numbers, booleans and null become
//! scalars. Writes are minimal diffs: only values that differ produce operations, nested maps and
//! lists are updated in place, so concurrent edits of different fields (or different nested
//! keys) merge instead of overwriting each other.
//!
//! Root keys starting with `@` are reserved for tidesync. The only one today is
//! [`DELETED_KEY`], the tombstone:
//! - delete sets `@deleted = true` and removes every field it can see;
//! - a put on a deleted object removes `@deleted` (the object is revived) and sets its fields;
//! - a delete and a concurrent edit: the edit never removes `@deleted`, so **delete wins**.
//!   The edit's fields stay in the document and its history; if the object is later revived,
//!   fields the delete did not see reappear.
//! - two concurrent deletes both set `@deleted`; the object stays deleted.
//!
//! Reading picks Automerge's deterministic winner for concurrently written fields, so every node
//! holding the same changes prints byte-identical JSON (keys are sorted).

use automerge::transaction::Transactable;
use automerge::{ObjId, ObjType, Prop, ROOT, ReadDoc, ScalarValue, Value};
use serde_json::{Map, Number, Value as Json};

/// The root key that marks an object deleted.
pub const DELETED_KEY: &str = "@deleted";
/// Root field names starting with this are reserved for tidesync.
pub const RESERVED_PREFIX: char = '@';
/// Deepest nesting of JSON maps and lists accepted in an object, in levels.
pub const MAX_JSON_DEPTH: usize = 32;

/// Why a set of fields could not be written to a document.
#[derive(Debug, thiserror::Error)]
pub enum FieldsError {
    #[error("field name {0:?} is reserved (names starting with '@' belong to tidesync)")]
    Reserved(String),
    #[error("field name must not be empty")]
    EmptyName,
    #[error("value of field {field:?} nests deeper than {MAX_JSON_DEPTH} levels")]
    TooDeep { field: String },
    #[error("automerge refused the write: {0}")]
    Automerge(#[from] automerge::AutomergeError),
    #[error("the object appears more than once in one batch")]
    Duplicate,
    #[error(
        "the change is {bytes} bytes, over the limit of {limit} bytes for one change written here (MAX_LOCAL_CHANGE_BYTES: it must fit in one sync frame); nothing was stored"
    )]
    TooLarge { bytes: usize, limit: usize },
}

/// Check that `fields` can be written as an object's root fields.
pub fn validate_fields(fields: &Map<String, Json>) -> Result<(), FieldsError> {
    for (k, v) in fields {
        if k.is_empty() {
            return Err(FieldsError::EmptyName);
        }
        if k.starts_with(RESERVED_PREFIX) {
            return Err(FieldsError::Reserved(k.clone()));
        }
        if depth(v) > MAX_JSON_DEPTH {
            return Err(FieldsError::TooDeep { field: k.clone() });
        }
    }
    Ok(())
}

fn depth(v: &Json) -> usize {
    match v {
        Json::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        Json::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// The bytes stored as a document's current state: Automerge's compact saved form. (Saving
/// without DEFLATE was measured and gained nothing on the 50,000-object benchmark.)
pub fn save_state(doc: &automerge::Automerge) -> Vec<u8> {
    doc.save()
}

/// Whether the document carries the tombstone.
pub fn is_deleted(doc: &impl ReadDoc) -> bool {
    matches!(doc.get(ROOT, DELETED_KEY), Ok(Some(_)))
}

/// The object's fields as JSON, without reserved keys.
pub fn to_json(doc: &impl ReadDoc) -> Map<String, Json> {
    map_json(doc, &ROOT, |key| !key.starts_with(RESERVED_PREFIX))
}

/// The JSON of the map `obj`'s keys that `keep` keeps, read in one pass (a range), not key by
/// key.
fn map_json(doc: &impl ReadDoc, obj: &ObjId, keep: impl Fn(&str) -> bool) -> Map<String, Json> {
    doc.map_range(obj, ..)
        .filter(|item| keep(&item.key))
        .map(|item| {
            let id = item.id();
            let json = value_to_json(doc, item.value.into_value(), &id);
            (item.key.into_owned(), json)
        })
        .collect()
}

/// The files the object's fields refer to (see [`crate::files`]): each hash once with the size
/// its first reference gives, at most [`crate::files::MAX_FILE_REFS_PER_OBJECT`].
/// Malformed references (which a peer's document may hold) are no files and are skipped. Only
/// maps holding a `$file` key are turned into JSON, so a document without files costs a walk.
pub fn file_refs(doc: &impl ReadDoc) -> Vec<(crate::files::FileHash, u64)> {
    use crate::files::FILE_KEY;
    use automerge::ValueRef;
    // Each map and list is read in one pass (a range), not key by key.
    let is_object = |v: &ValueRef<'_>| {
        matches!(
            v,
            ValueRef::Object(ObjType::Map | ObjType::Table | ObjType::List)
        )
    };
    let roots = doc
        .map_range(ROOT, ..)
        .filter(|item| !item.key.starts_with(RESERVED_PREFIX) && is_object(&item.value))
        .map(|item| item.id())
        .collect();
    walk_file_refs(roots, |obj| match doc.object_type(&obj) {
        Ok(ObjType::List) => Step::Children(
            doc.list_range(&obj, ..)
                .filter(|item| is_object(&item.value))
                .map(|item| item.id())
                .collect(),
        ),
        Ok(ObjType::Map | ObjType::Table) => {
            let mut children = Vec::new();
            for item in doc.map_range(&obj, ..) {
                if item.key == FILE_KEY {
                    return Step::File(std::borrow::Cow::Owned(value_to_json(
                        doc,
                        Value::Object(ObjType::Map),
                        &obj,
                    )));
                }
                if is_object(&item.value) {
                    children.push(item.id());
                }
            }
            Step::Children(children)
        }
        _ => Step::Leaf,
    })
}

/// What [`file_refs`] finds in a document written from `fields` alone (a new one): the same
/// walk, over the JSON, so the document need not be read back.
pub fn file_refs_in(fields: &Map<String, Json>) -> Vec<(crate::files::FileHash, u64)> {
    use crate::files::FILE_KEY;
    let roots = fields
        .iter()
        .filter(|(k, _)| !k.starts_with(RESERVED_PREFIX))
        .map(|(_, v)| v)
        .collect();
    walk_file_refs(roots, |v: &Json| match v {
        Json::Array(items) => Step::Children(items.iter().collect()),
        Json::Object(m) if m.contains_key(FILE_KEY) => Step::File(std::borrow::Cow::Borrowed(v)),
        Json::Object(m) => Step::Children(m.values().collect()),
        _ => Step::Leaf,
    })
}

/// One value met on the walk for file references: the values inside it, or the reference it
/// may be (a map holding `$file`).
enum Step<'a, N> {
    Children(Vec<N>),
    File(std::borrow::Cow<'a, Json>),
    Leaf,
}

/// The walk behind [`file_refs`] and [`file_refs_in`]: depth first from the last root, each
/// hash once with the size its first well-formed reference gives, at most
/// [`crate::files::MAX_FILE_REFS_PER_OBJECT`].
fn walk_file_refs<'a, N>(
    roots: Vec<N>,
    mut step: impl FnMut(N) -> Step<'a, N>,
) -> Vec<(crate::files::FileHash, u64)> {
    use crate::files::{FileRef, MAX_FILE_REFS_PER_OBJECT};
    let mut out: Vec<(crate::files::FileHash, u64)> = Vec::new();
    let mut stack = roots;
    while let Some(node) = stack.pop() {
        if out.len() >= MAX_FILE_REFS_PER_OBJECT {
            break;
        }
        match step(node) {
            Step::Children(children) => stack.extend(children),
            Step::File(json) => {
                if let Some(Ok(r)) = FileRef::parse(&json)
                    && !out.iter().any(|(h, _)| *h == r.hash)
                {
                    out.push((r.hash, r.size));
                }
            }
            Step::Leaf => {}
        }
    }
    out
}

/// The JSON of one value (`value`, whose object id is `obj` when it is an object).
pub fn value_json(doc: &impl ReadDoc, value: Value<'_>, obj: &ObjId) -> Json {
    value_to_json(doc, value, obj)
}

/// Write `new` at `obj[prop]` from scratch, one operation on `prop` superseding every value
/// it holds (a resolution, see [`crate::concurrent`]).
pub fn write_value<T: Transactable + ReadDoc>(
    tx: &mut T,
    obj: &ObjId,
    prop: Prop,
    new: &Json,
) -> Result<(), automerge::AutomergeError> {
    write_new(tx, obj, prop, new, false)
}

fn value_to_json(doc: &impl ReadDoc, value: Value<'_>, obj: &ObjId) -> Json {
    match value {
        Value::Scalar(s) => scalar_to_json(&s),
        Value::Object(ObjType::Map | ObjType::Table) => Json::Object(map_json(doc, obj, |_| true)),
        // In one pass (a range), not index by index.
        Value::Object(ObjType::List) => Json::Array(
            doc.list_range(obj, ..)
                .map(|item| {
                    let id = item.id();
                    value_to_json(doc, item.value.into_value(), &id)
                })
                .collect(),
        ),
        Value::Object(ObjType::Text) => Json::String(doc.text(obj).unwrap_or_default()),
    }
}

/// JSON for a scalar. Bytes (which tidesync never writes, but other Automerge writers may)
/// become lowercase hex strings; counters and timestamps become numbers.
fn scalar_to_json(s: &ScalarValue) -> Json {
    match s {
        ScalarValue::Str(s) => Json::String(s.to_string()),
        ScalarValue::Int(i) => Json::Number((*i).into()),
        ScalarValue::Uint(u) => Json::Number((*u).into()),
        ScalarValue::F64(f) => Number::from_f64(*f).map(Json::Number).unwrap_or(Json::Null),
        ScalarValue::Counter(c) => Json::Number(i64::from(c).into()),
        ScalarValue::Timestamp(t) => Json::Number((*t).into()),
        ScalarValue::Boolean(b) => Json::Bool(*b),
        ScalarValue::Bytes(b) => Json::String(hex::encode(b)),
        ScalarValue::Null | ScalarValue::Unknown { .. } => Json::Null,
    }
}

fn json_to_scalar(v: &Json) -> Option<ScalarValue> {
    Some(match v {
        Json::Null => ScalarValue::Null,
        Json::Bool(b) => ScalarValue::Boolean(*b),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                ScalarValue::Int(i)
            } else if let Some(u) = n.as_u64() {
                ScalarValue::Uint(u)
            } else {
                ScalarValue::F64(n.as_f64()?)
            }
        }
        Json::String(s) => ScalarValue::Str(s.as_str().into()),
        Json::Array(_) | Json::Object(_) => return None,
    })
}

/// Apply a PUT: set every field in `fields` whose value differs, remove fields whose new value is
/// null, leave other fields alone, and revive the object if it was deleted. Nested values are
/// replaced as a whole but written as minimal diffs. Returns whether any operation was made.
pub fn put_fields<T: Transactable + ReadDoc>(
    tx: &mut T,
    fields: &Map<String, Json>,
) -> Result<(), FieldsError> {
    validate_fields(fields)?;
    if is_deleted(tx) {
        tx.delete(ROOT, DELETED_KEY)?;
    }
    for (key, value) in fields {
        if value.is_null() {
            if tx.get(ROOT, key.as_str())?.is_some() {
                tx.delete(ROOT, key.as_str())?;
            }
        } else {
            update(tx, &ROOT, Prop::Map(key.clone()), value)?;
        }
    }
    Ok(())
}

/// Set the fields of a new, empty document: what [`put_fields`] writes there, without
/// reading what is not there (a null sets nothing). The whole tree goes in as one batch
/// (Automerge's `init_root_from_hydrate`), which splices the op set once instead of once per
/// value; it is only correct on a document with no root keys, which a new one is.
pub fn put_new_fields<T: Transactable + ReadDoc>(
    tx: &mut T,
    fields: &Map<String, Json>,
) -> Result<(), FieldsError> {
    validate_fields(fields)?;
    let root: std::collections::HashMap<String, automerge::hydrate::Value> = fields
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.clone(), to_hydrate(v)))
        .collect();
    tx.init_root_from_hydrate(&root.into())?;
    Ok(())
}

/// A JSON value as the tree Automerge writes in one batch: the same maps, lists and scalars
/// [`write_new`] makes one operation at a time. Depth is bounded by [`validate_fields`].
fn to_hydrate(v: &Json) -> automerge::hydrate::Value {
    use automerge::hydrate::Value as H;
    match v {
        Json::Object(m) => H::Map(
            m.iter()
                .map(|(k, v)| (k.clone(), to_hydrate(v)))
                .collect::<std::collections::HashMap<String, H>>()
                .into(),
        ),
        Json::Array(items) => H::List(items.iter().map(to_hydrate).collect::<Vec<H>>().into()),
        scalar => H::Scalar(json_to_scalar(scalar).unwrap_or(ScalarValue::Null)),
    }
}

/// Apply a DELETE: set the tombstone and remove every field this node can see.
pub fn delete_object<T: Transactable + ReadDoc>(tx: &mut T) -> Result<(), FieldsError> {
    let keys: Vec<String> = tx
        .keys(ROOT)
        .filter(|k| !k.starts_with(RESERVED_PREFIX))
        .collect();
    for key in keys {
        tx.delete(ROOT, key.as_str())?;
    }
    tx.put(ROOT, DELETED_KEY, true)?;
    Ok(())
}

/// Make the value at `obj[prop]` equal `new`, writing only what differs.
fn update<T: Transactable + ReadDoc>(
    tx: &mut T,
    obj: &ObjId,
    prop: Prop,
    new: &Json,
) -> Result<(), automerge::AutomergeError> {
    let current = tx
        .get(obj, prop.clone())?
        .map(|(v, id)| (v.into_owned(), id));
    match (current, new) {
        (Some((Value::Object(ObjType::Map | ObjType::Table), child)), Json::Object(m)) => {
            sync_map(tx, &child, m)
        }
        (Some((Value::Object(ObjType::List), child)), Json::Array(items)) => {
            sync_list(tx, &child, items)
        }
        (Some((Value::Object(ObjType::Text), child)), Json::String(s)) => {
            if tx.text(&child)? != *s {
                tx.update_text(&child, s)?;
            }
            Ok(())
        }
        (Some((Value::Scalar(s), _)), new) if scalar_to_json(&s) == *new => Ok(()),
        _ => write_new(tx, obj, prop, new, false),
    }
}

fn sync_map<T: Transactable + ReadDoc>(
    tx: &mut T,
    obj: &ObjId,
    new: &Map<String, Json>,
) -> Result<(), automerge::AutomergeError> {
    let stale: Vec<String> = tx.keys(obj).filter(|k| !new.contains_key(k)).collect();
    for key in stale {
        tx.delete(obj, key.as_str())?;
    }
    for (key, value) in new {
        update(tx, obj, Prop::Map(key.clone()), value)?;
    }
    Ok(())
}

fn sync_list<T: Transactable + ReadDoc>(
    tx: &mut T,
    obj: &ObjId,
    new: &[Json],
) -> Result<(), automerge::AutomergeError> {
    let len = tx.length(obj);
    for (i, value) in new.iter().enumerate().take(len) {
        update(tx, obj, Prop::Seq(i), value)?;
    }
    for (i, value) in new.iter().enumerate().skip(len) {
        write_new(tx, obj, Prop::Seq(i), value, true)?;
    }
    for i in (new.len()..len).rev() {
        tx.delete(obj, i)?;
    }
    Ok(())
}

/// Write `new` at `obj[prop]` from scratch; `insert` inserts into a list instead of overwriting.
fn write_new<T: Transactable + ReadDoc>(
    tx: &mut T,
    obj: &ObjId,
    prop: Prop,
    new: &Json,
    insert: bool,
) -> Result<(), automerge::AutomergeError> {
    let kind = match new {
        Json::Object(_) => ObjType::Map,
        Json::Array(_) => ObjType::List,
        scalar => {
            let s = json_to_scalar(scalar).unwrap_or(ScalarValue::Null);
            return match (prop, insert) {
                (Prop::Seq(i), true) => tx.insert(obj, i, s),
                (prop, _) => tx.put(obj, prop, s),
            };
        }
    };
    let child = match (prop, insert) {
        (Prop::Seq(i), true) => tx.insert_object(obj, i, kind)?,
        (prop, _) => tx.put_object(obj, prop, kind)?,
    };
    match new {
        Json::Object(m) => {
            for (k, v) in m {
                write_new(tx, &child, Prop::Map(k.clone()), v, false)?;
            }
        }
        Json::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                write_new(tx, &child, Prop::Seq(i), v, true)?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::{ActorId, Automerge};
    use proptest::prelude::*;
    use serde_json::json;

    fn doc(actor: u8) -> Automerge {
        Automerge::new().with_actor(ActorId::from([actor; 8]))
    }

    fn put(d: &mut Automerge, v: Json) {
        let mut tx = d.transaction();
        put_fields(&mut tx, v.as_object().unwrap()).unwrap();
        tx.commit();
    }

    fn del(d: &mut Automerge) {
        let mut tx = d.transaction();
        delete_object(&mut tx).unwrap();
        tx.commit();
    }

    fn merged(a: &Automerge, b: &Automerge) -> Automerge {
        let mut m = a.fork();
        m.merge(&mut b.fork()).unwrap();
        m
    }

    fn arb_json() -> impl Strategy<Value = Json> {
        let leaf = prop_oneof![
            Just(Json::Null),
            any::<bool>().prop_map(Json::Bool),
            any::<i64>().prop_map(|i| json!(i)),
            any::<u64>().prop_map(|u| json!(u)),
            (-1e12f64..1e12).prop_map(|f| json!(f)),
            ".{0,12}".prop_map(Json::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Json::Array),
                proptest::collection::btree_map("[a-z@]{0,6}", inner, 0..6)
                    .prop_map(|m| Json::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Fields whose values hold file references (three hashes, sizes that disagree, some
    /// malformed) at any depth, among other values.
    fn arb_fields_with_files() -> impl Strategy<Value = Map<String, Json>> {
        let file = (0u8..3, 0u64..3, any::<bool>()).prop_map(|(h, size, good)| {
            let hash = format!("{h}").repeat(64);
            if good {
                json!({"$file": hash, "size": size})
            } else {
                json!({"$file": hash, "size": "big"})
            }
        });
        let leaf = prop_oneof![file, any::<i64>().prop_map(|i| json!(i))];
        let tree = leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Json::Array),
                proptest::collection::btree_map("[a-z]{1,4}", inner, 0..6)
                    .prop_map(|m| Json::Object(m.into_iter().collect())),
            ]
        });
        proptest::collection::btree_map("[a-z][a-z0-9_]{0,8}", tree, 0..8)
            .prop_map(|m| m.into_iter().collect())
    }

    fn arb_fields() -> impl Strategy<Value = Map<String, Json>> {
        // Top-level nulls mean "remove", so a round trip uses non-null top-level values.
        proptest::collection::btree_map("[a-z][a-z0-9_]{0,8}", arb_json(), 0..8)
            .prop_map(|m| m.into_iter().filter(|(_, v)| !v.is_null()).collect())
    }

    proptest! {
        #[test]
        fn json_round_trips(fields in arb_fields()) {
            let mut d = doc(1);
            put(&mut d, Json::Object(fields.clone()));
            prop_assert_eq!(to_json(&d), fields.clone());
            // Saved and reloaded, the same JSON comes back.
            let reloaded = Automerge::load(&d.save()).unwrap();
            prop_assert_eq!(to_json(&reloaded), fields);
        }

        /// The batched path for new documents holds what the general one writes: the same
        /// JSON in the document, after a save and a load, on a node that applies its one change,
        /// and after the same edit on top (its op ids differ, in breadth-first order).
        #[test]
        fn a_new_document_holds_the_same_either_way(
            fields in arb_fields(),
            gone in "[a-z]{1,4}",
            edit in arb_fields(),
        ) {
            let mut with_null = fields.clone();
            with_null.insert(gone.clone(), Json::Null);
            let mut expected = fields.clone();
            expected.remove(&gone);
            let (mut a, mut b) = (doc(1), doc(1));
            let options = || automerge::transaction::CommitOptions::default().with_time(7);
            let mut tx = a.transaction();
            put_fields(&mut tx, &with_null).unwrap();
            tx.commit_with(options());
            let mut tx = b.transaction();
            put_new_fields(&mut tx, &with_null).unwrap();
            tx.commit_with(options());
            prop_assert_eq!(to_json(&a), expected.clone());
            prop_assert_eq!(to_json(&b), expected.clone());
            prop_assert_eq!(file_refs(&a), file_refs(&b));
            prop_assert_eq!(to_json(&Automerge::load(&b.save()).unwrap()), expected.clone());
            let mut peer = Automerge::new();
            peer.apply_changes(b.get_changes(&[])).unwrap();
            prop_assert_eq!(to_json(&peer), expected);
            put(&mut a, Json::Object(edit.clone()));
            put(&mut b, Json::Object(edit));
            prop_assert_eq!(to_json(&a), to_json(&b));
        }

        /// The walk over a new document's JSON finds what the walk over the document finds,
        /// in the same order: the same first size for a hash referred to twice.
        #[test]
        fn file_refs_of_the_json_are_those_of_the_document(fields in arb_fields_with_files()) {
            let mut d = doc(1);
            let mut tx = d.transaction();
            put_new_fields(&mut tx, &fields).unwrap();
            tx.commit();
            prop_assert_eq!(file_refs_in(&fields), file_refs(&d));
        }

        #[test]
        fn rewriting_any_object_into_another_gives_exactly_the_new_one(a in arb_fields(), b in arb_fields()) {
            let mut d = doc(1);
            put(&mut d, Json::Object(a.clone()));
            let mut removals = b.clone();
            for k in a.keys() {
                removals.entry(k.clone()).or_insert(Json::Null);
            }
            put(&mut d, Json::Object(removals));
            prop_assert_eq!(to_json(&d), b);
        }
    }

    #[test]
    fn an_identical_put_makes_no_change() {
        let mut d = doc(1);
        put(
            &mut d,
            json!({"status": "received", "volume_ml": 2.5, "tags": ["a", {"b": 1}]}),
        );
        let heads = d.get_heads();
        put(
            &mut d,
            json!({"status": "received", "tags": ["a", {"b": 1}]}),
        );
        assert_eq!(d.get_heads(), heads);
    }

    #[test]
    fn null_removes_a_field_and_others_are_untouched() {
        let mut d = doc(1);
        put(&mut d, json!({"status": "received", "volume_ml": 2.5}));
        put(&mut d, json!({"status": null, "note": "x"}));
        assert_eq!(
            Json::Object(to_json(&d)),
            json!({"volume_ml": 2.5, "note": "x"})
        );
    }

    #[test]
    fn concurrent_edits_of_different_fields_both_survive() {
        let mut a = doc(1);
        put(
            &mut a,
            json!({"status": "received", "meta": {"x": 1, "y": 1}}),
        );
        let mut b = a.fork().with_actor(ActorId::from([2u8; 8]));
        put(
            &mut a,
            json!({"status": "analysed", "meta": {"x": 2, "y": 1}}),
        );
        put(&mut b, json!({"volume_ml": 3, "meta": {"x": 1, "y": 5}}));
        let m = merged(&a, &b);
        assert_eq!(
            Json::Object(to_json(&m)),
            json!({"status": "analysed", "volume_ml": 3, "meta": {"x": 2, "y": 5}})
        );
        assert_eq!(to_json(&m), to_json(&merged(&b, &a)));
    }

    #[test]
    fn concurrent_edits_of_one_field_agree_on_one_value() {
        let mut a = doc(1);
        put(&mut a, json!({"status": "received"}));
        let mut b = a.fork().with_actor(ActorId::from([2u8; 8]));
        put(&mut a, json!({"status": "from-a"}));
        put(&mut b, json!({"status": "from-b"}));
        let ab = serde_json::to_string(&to_json(&merged(&a, &b))).unwrap();
        let ba = serde_json::to_string(&to_json(&merged(&b, &a))).unwrap();
        assert_eq!(ab, ba);
    }

    #[test]
    fn delete_wins_over_a_concurrent_edit_and_a_later_put_revives() {
        let mut a = doc(1);
        put(&mut a, json!({"status": "received", "volume_ml": 2.5}));
        let mut b = a.fork().with_actor(ActorId::from([2u8; 8]));
        del(&mut a);
        put(&mut b, json!({"status": "analysed"}));
        let mut m = merged(&a, &b);
        assert!(is_deleted(&m));
        assert!(is_deleted(&merged(&b, &a)));
        // The concurrent edit is kept, not lost: reviving shows the field the delete never saw.
        put(&mut m, json!({"note": "revived"}));
        assert!(!is_deleted(&m));
        assert_eq!(
            Json::Object(to_json(&m)),
            json!({"status": "analysed", "note": "revived"})
        );
    }

    #[test]
    fn reserved_and_deep_fields_are_refused() {
        let mut d = doc(1);
        let mut tx = d.transaction();
        let reserved = json!({"@deleted": false});
        assert!(matches!(
            put_fields(&mut tx, reserved.as_object().unwrap()),
            Err(FieldsError::Reserved(_))
        ));
        let mut deep = json!(1);
        for _ in 0..=MAX_JSON_DEPTH {
            deep = json!([deep]);
        }
        let deep = json!({"x": deep});
        assert!(matches!(
            put_fields(&mut tx, deep.as_object().unwrap()),
            Err(FieldsError::TooDeep { .. })
        ));
    }
}
