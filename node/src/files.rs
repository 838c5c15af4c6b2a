//! Files: their content address (BLAKE3), the reference a field holds, and the limits.
//!
//! # The reference a field holds
//! A field that refers to a file holds a JSON object with a `$file` member:
//!
//! ```json
//! {"$file": "<64 hex digits: the BLAKE3 hash of the bytes>", "size": 48213,
//!  "name": "report.pdf", "type": "application/pdf"}
//! ```
//!
//! `$file` and `size` are required; `name` (the file's name, without a directory) and `type`
//! (its media type) are optional. Nothing else may be in the object. The reference is an
//! ordinary field value inside a signed change, so every file is bound to the signed change
//! that referenced it: a file whose bytes do not hash to `$file`, or whose length is not
//! `size`, is not that file. References may sit at any depth (in a list, in a nested map).
//!
//! The hash is BLAKE3's, which is also the root of BLAKE3's verified streaming (bao), so
//! transfers can check each chunk against the address as it arrives.

use std::fmt;
use std::str::FromStr;

use serde_json::{Map, Value as Json};

/// Largest file a node stores, in bytes (1 TiB): sizes are 64-bit and nothing buffers a file.
pub const MAX_FILE_BYTES: u64 = 1 << 40;
/// Longest `name` a reference may carry, in bytes.
pub const MAX_FILE_NAME_BYTES: usize = 255;
/// Longest media `type` a reference may carry, in bytes.
pub const MAX_MEDIA_TYPE_BYTES: usize = 127;
/// Most file references read from one object: an object naming more is refused.
pub const MAX_FILE_REFS_PER_OBJECT: usize = 10_000;
/// Bytes read or written at a time when a file is streamed.
pub const FILE_CHUNK_BYTES: usize = 1024 * 1024;
/// The member that marks a reference.
pub const FILE_KEY: &str = "$file";

/// A file's content address: the BLAKE3 hash of its bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileHash(pub [u8; 32]);

impl FileHash {
    /// The address of `bytes`.
    pub fn of(bytes: &[u8]) -> FileHash {
        FileHash(*blake3::hash(bytes).as_bytes())
    }
}

/// Hex in JSON and TOML, the 32 bytes in postcard.
impl serde::Serialize for FileHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> serde::Deserialize<'de> for FileHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let text = String::deserialize(d)?;
            text.parse().map_err(serde::de::Error::custom)
        } else {
            <[u8; 32]>::deserialize(d).map(FileHash)
        }
    }
}

impl fmt::Display for FileHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for FileHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FileHash({self})")
    }
}

/// Why a text is not a file reference or a hash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileRefError {
    #[error("{0:?} is not a file hash (64 hex digits of BLAKE3)")]
    Hash(String),
    #[error("a file reference needs `$file` and `size`, and may have only `name` and `type`: {0}")]
    Shape(String),
    #[error("a file reference's {what} is longer than {max} bytes")]
    TooLong { what: &'static str, max: usize },
    #[error("a file reference's size {0} is over the limit of {MAX_FILE_BYTES} bytes")]
    TooLarge(u64),
    #[error("an object may refer to at most {MAX_FILE_REFS_PER_OBJECT} files")]
    TooMany,
}

impl FromStr for FileHash {
    type Err = FileRefError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        if s.len() != 64 || hex::decode_to_slice(s, &mut out).is_err() {
            return Err(FileRefError::Hash(s.chars().take(80).collect()));
        }
        Ok(FileHash(out))
    }
}

/// What a field says of a file (see the module's docs for its JSON form).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRef {
    pub hash: FileHash,
    pub size: u64,
    pub name: Option<String>,
    pub media_type: Option<String>,
}

impl FileRef {
    /// The JSON a field holds for this file.
    pub fn to_json(&self) -> Json {
        let mut m = Map::new();
        m.insert(FILE_KEY.into(), Json::String(self.hash.to_string()));
        m.insert("size".into(), Json::from(self.size));
        if let Some(n) = &self.name {
            m.insert("name".into(), Json::String(n.clone()));
        }
        if let Some(t) = &self.media_type {
            m.insert("type".into(), Json::String(t.clone()));
        }
        Json::Object(m)
    }

    /// The reference `value` is, if it is one (an object with a `$file` member); an object
    /// with `$file` that is not a well-formed reference is an error.
    pub fn parse(value: &Json) -> Option<Result<FileRef, FileRefError>> {
        let m = value.as_object()?;
        let hash = m.get(FILE_KEY)?;
        Some(Self::parse_map(m, hash))
    }

    fn parse_map(m: &Map<String, Json>, hash: &Json) -> Result<FileRef, FileRefError> {
        let shape = || FileRefError::Shape(Json::Object(m.clone()).to_string());
        if m.keys()
            .any(|k| !matches!(k.as_str(), FILE_KEY | "size" | "name" | "type"))
        {
            return Err(shape());
        }
        let hash: FileHash = hash.as_str().ok_or_else(shape)?.parse()?;
        let size = m.get("size").and_then(Json::as_u64).ok_or_else(shape)?;
        if size > MAX_FILE_BYTES {
            return Err(FileRefError::TooLarge(size));
        }
        let text = |key: &str, what: &'static str, max: usize| match m.get(key) {
            None => Ok(None),
            Some(Json::String(s)) if s.len() <= max => Ok(Some(s.clone())),
            Some(Json::String(_)) => Err(FileRefError::TooLong { what, max }),
            Some(_) => Err(shape()),
        };
        Ok(FileRef {
            hash,
            size,
            name: text("name", "name", MAX_FILE_NAME_BYTES)?,
            media_type: text("type", "media type", MAX_MEDIA_TYPE_BYTES)?,
        })
    }

    /// Every file reference in an object's fields, at any depth, in field order; an error for
    /// a malformed one or for more than [`MAX_FILE_REFS_PER_OBJECT`].
    pub fn all_in(fields: &Map<String, Json>) -> Result<Vec<FileRef>, FileRefError> {
        let mut out = Vec::new();
        let mut stack: Vec<&Json> = fields.values().rev().collect();
        while let Some(v) = stack.pop() {
            if let Some(r) = FileRef::parse(v) {
                if out.len() >= MAX_FILE_REFS_PER_OBJECT {
                    return Err(FileRefError::TooMany);
                }
                out.push(r?);
                continue;
            }
            match v {
                Json::Array(items) => stack.extend(items.iter().rev()),
                Json::Object(m) => stack.extend(m.values().rev()),
                _ => {}
            }
        }
        Ok(out)
    }
}

/// The media type of a file, from its name's extension, for the common ones.
pub fn media_type(path: &std::path::Path) -> Option<&'static str> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    Some(match ext.as_str() {
        "pdf" => "application/pdf",
        "json" => "application/json",
        "csv" => "text/csv",
        "txt" => "text/plain",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "tif" | "tiff" => "image/tiff",
        "mp4" => "video/mp4",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_reference_round_trips_and_is_found_at_any_depth() {
        let r = FileRef {
            hash: FileHash::of(b"report"),
            size: 6,
            name: Some("report.pdf".into()),
            media_type: Some("application/pdf".into()),
        };
        assert_eq!(FileRef::parse(&r.to_json()), Some(Ok(r.clone())));
        let fields =
            json!({"title": "x", "report": r.to_json(), "images": [{"nested": r.to_json()}]});
        let found = FileRef::all_in(fields.as_object().unwrap()).unwrap();
        assert_eq!(found, vec![r.clone(), r]);
        assert_eq!(FileRef::parse(&json!({"title": "not a file"})), None);
    }

    #[test]
    fn malformed_references_are_refused() {
        let h = FileHash::of(b"x").to_string();
        for bad in [
            json!({"$file": "abc", "size": 1}),
            json!({"$file": h, "size": -1}),
            json!({"$file": h}),
            json!({"$file": h, "size": 1, "extra": true}),
            json!({"$file": h, "size": 1, "name": 5}),
            json!({"$file": h, "size": MAX_FILE_BYTES + 1}),
            json!({"$file": h, "size": 1, "name": "n".repeat(MAX_FILE_NAME_BYTES + 1)}),
        ] {
            assert!(matches!(FileRef::parse(&bad), Some(Err(_))), "{bad}");
        }
    }

    #[test]
    fn the_hash_is_blake3_in_hex() {
        let h = FileHash::of(b"");
        assert_eq!(
            h.to_string(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        assert_eq!(h.to_string().parse::<FileHash>(), Ok(h));
        assert!("zz".parse::<FileHash>().is_err());
    }
}
