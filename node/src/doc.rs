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
    let mut out = Map::new();
    for key in doc.keys(ROOT) {
        if key.starts_with(RESERVED_PREFIX) {
            continue;
        }
        if let Ok(Some((value, obj))) = doc.get(ROOT, key.as_str()) {
            out.insert(key, value_to_json(doc, value, &obj));
        }
    }
    out
}

/// The files the object's fields refer to (see [`crate::files`]): each hash once with the size
/// its first reference gives, at most [`crate::files::MAX_FILE_REFS_PER_OBJECT`].
/// Malformed references (which a peer's document may hold) are no files and are skipped. Only
/// maps holding a `$file` key are turned into JSON, so a document without files costs a walk.
pub fn file_refs(doc: &impl ReadDoc) -> Vec<(crate::files::FileHash, u64)> {
    use crate::files::{FILE_KEY, FileRef, MAX_FILE_REFS_PER_OBJECT};
    let mut out: Vec<(crate::files::FileHash, u64)> = Vec::new();
    let mut stack: Vec<ObjId> = Vec::new();
    let visit = |stack: &mut Vec<ObjId>, value: Value<'_>, obj: ObjId| {
        if let Value::Object(ObjType::Map | ObjType::Table | ObjType::List) = value {
            stack.push(obj);
        }
    };
    for key in doc.keys(ROOT) {
        if key.starts_with(RESERVED_PREFIX) {
            continue;
        }
        if let Ok(Some((value, obj))) = doc.get(ROOT, key.as_str()) {
            visit(&mut stack, value, obj);
        }
    }
    while let Some(obj) = stack.pop() {
        if out.len() >= MAX_FILE_REFS_PER_OBJECT {
            break;
        }
        match doc.object_type(&obj) {
            Ok(ObjType::List) => {
                for i in 0..doc.length(&obj) {
                    if let Ok(Some((value, child))) = doc.get(&obj, i) {
                        visit(&mut stack, value, child);
                    }
                }
            }
            Ok(ObjType::Map | ObjType::Table) => {
                if let Ok(Some(_)) = doc.get(&obj, FILE_KEY) {
                    let json = value_to_json(doc, Value::Object(ObjType::Map), &obj);
                    if let Some(Ok(r)) = FileRef::parse(&json)
                        && !out.iter().any(|(h, _)| *h == r.hash)
                    {
                        out.push((r.hash, r.size));
                    }
                    continue;
                }
                for key in doc.keys(&obj) {
                    if let Ok(Some((value, child))) = doc.get(&obj, key.as_str()) {
                        visit(&mut stack, value, child);
                    }
                }
            }
            _ => {}
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
        Value::Object(ObjType::Map | ObjType::Table) => {
            let mut m = Map::new();
            for key in doc.keys(obj) {
                if let Ok(Some((v, child))) = doc.get(obj, key.as_str()) {
                    m.insert(key, value_to_json(doc, v, &child));
                }
            }
            Json::Object(m)
        }
        Value::Object(ObjType::List) => Json::Array(
            (0..doc.length(obj))
                .filter_map(|i| doc.get(obj, i).ok().flatten())
                .map(|(v, child)| value_to_json(doc, v, &child))
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
/// reading what is not there (a null sets nothing).
pub fn put_new_fields<T: Transactable + ReadDoc>(
    tx: &mut T,
    fields: &Map<String, Json>,
) -> Result<(), FieldsError> {
    validate_fields(fields)?;
    for (key, value) in fields.iter().filter(|(_, v)| !v.is_null()) {
        write_new(tx, &ROOT, Prop::Map(key.clone()), value, false)?;
    }
    Ok(())
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

        /// The fast path for new documents writes the very change the general one writes.
        #[test]
        fn a_new_document_gets_the_same_change_either_way(fields in arb_fields(), gone in "[a-z]{1,4}") {
            let mut fields = fields;
            fields.insert(gone, Json::Null);
            let (mut a, mut b) = (doc(1), doc(1));
            let options = || automerge::transaction::CommitOptions::default().with_time(7);
            let mut tx = a.transaction();
            put_fields(&mut tx, &fields).unwrap();
            tx.commit_with(options());
            let mut tx = b.transaction();
            put_new_fields(&mut tx, &fields).unwrap();
            tx.commit_with(options());
            prop_assert_eq!(a.save(), b.save());
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
