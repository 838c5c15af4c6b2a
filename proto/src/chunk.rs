//! Our own bounded reader of an Automerge change chunk: header, hash and op columns, read
//! before Automerge parses a single op of untrusted bytes.
//!
//! Automerge 0.12 trusts counts in its input: a compressed chunk inflates without limit, an
//! RLE run may claim 2^62 ops (its decoder then loops for ever), and a counter of 2^32 or more
//! panics in a conversion. So a change from a peer or a bundle is read here first, in two
//! steps that allocate and loop only in proportion to the bytes actually present:
//!
//! 1. [`ChangeHeader::parse`] (before the signature is checked): the chunk envelope and the
//!    change header, which is all that names the change's hash and author.
//! 2. [`ChangeHeader::check_ops`] (after the signature is checked): walks every op column
//!    without building ops, and bounds what Automerge will later decode.
//!
//! Format (the Automerge binary format, chunk type 1, which is all we accept):
//!
//! ```text
//! chunk  = magic 85 6f 4a 83 | checksum (4 B = hash[..4]) | type (1 B, = 1) | uLEB len | body
//! hash   = SHA-256(type | uLEB len | body)
//! body   = uLEB n_deps, n_deps × 32 B hash | actor (uLEB len, bytes) | uLEB seq
//!          | uLEB start_op | sLEB time | message (uLEB len, UTF-8) | uLEB n_other, n_other actors
//!          | uLEB n_cols, n_cols × (uLEB spec, uLEB len) | column data | extra bytes
//! spec   = id << 4 | deflate (0x08) | type (0 group, 1 actor, 2 uLEB, 3 delta, 4 bool,
//!          5 string, 6 value metadata, 7 value)
//! RLE    = runs of: sLEB n > 0, one value repeated n times | n < 0, -n literal values
//!          | 0, uLEB count of nulls      (delta = RLE of sLEB differences)
//! bool   = uLEB counts of alternating false, true, false, ...
//! ```

use sha2::{Digest, Sha256};

/// Largest encoded change we accept, in bytes: a 4 MiB object (the API's limit) plus room for
/// its op columns. Checked before anything else is read.
pub const MAX_CHANGE_BYTES: usize = 5 * 1024 * 1024;

/// Most ops one change may hold, and most values any one of its columns may describe
/// (including the predecessors of all its ops together). A 4 MiB object of short values
/// stays well below; every loop over a change's ops is bounded by it.
pub const MAX_OPS_PER_CHANGE: u64 = 500_000;

/// Most dependencies one change may name.
pub const MAX_DEPS_PER_CHANGE: u64 = 1_024;

/// Most actors one change may name besides its own.
pub const MAX_OTHER_ACTORS_PER_CHANGE: u64 = 1_024;

/// Most op columns one change may have (Automerge writes 14 today).
pub const MAX_COLUMNS_PER_CHANGE: u64 = 64;

/// Largest actor id, in bytes (ours are 40: a 32-byte key and an 8-byte epoch).
pub const MAX_ACTOR_BYTES: u64 = 64;

/// Automerge counters (op counters, start op) are 32-bit inside Automerge.
const MAX_COUNTER: u64 = u32::MAX as u64;

pub(crate) const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
pub(crate) const CHUNK_CHANGE: u8 = 1;
pub(crate) const CHUNK_COMPRESSED: u8 = 2;

/// Why change bytes are not a change we accept. Every variant is the sender's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("change is {got} bytes, over the limit of {max} bytes")]
    TooLarge { got: usize, max: usize },
    #[error("not an Automerge chunk (bad magic bytes)")]
    Magic,
    #[error("compressed change chunks are refused: only uncompressed changes are signed")]
    Compressed,
    #[error("chunk type {0} is not a change")]
    NotAChange(u8),
    #[error("truncated: {0}")]
    Truncated(&'static str),
    #[error("{0} bytes after the end of the chunk")]
    Trailing(usize),
    #[error("checksum does not match the change hash")]
    Checksum,
    #[error("{what} is {got}, over the limit of {max}")]
    OverLimit {
        what: &'static str,
        got: u64,
        max: u64,
    },
    #[error("malformed: {0}")]
    Malformed(&'static str),
}

/// The header of a change chunk, read without touching its ops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeHeader {
    /// SHA-256 over the chunk type, length and body: Automerge's change hash.
    pub hash: [u8; 32],
    pub deps: Vec<[u8; 32]>,
    pub actor: Vec<u8>,
    pub seq: u64,
    pub start_op: u64,
    pub other_actors: u64,
    /// Each op column: (spec, byte range within the chunk).
    columns: Vec<(u32, std::ops::Range<usize>)>,
}

/// A cursor over a byte slice that never reads past its end.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, at: 0 }
    }

    fn done(&self) -> bool {
        self.at >= self.bytes.len()
    }

    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], ChunkError> {
        let left = (self.bytes.len() - self.at) as u64;
        if n > left {
            return Err(ChunkError::Truncated(what));
        }
        let s = &self.bytes[self.at..self.at + n as usize];
        self.at += n as usize;
        Ok(s)
    }

    fn uleb(&mut self, what: &'static str) -> Result<u64, ChunkError> {
        let mut value: u64 = 0;
        for i in 0..10 {
            let byte = *self.bytes.get(self.at).ok_or(ChunkError::Truncated(what))?;
            self.at += 1;
            let low = u64::from(byte & 0x7f);
            if i == 9 && low > 1 {
                return Err(ChunkError::Malformed("LEB128 number over 64 bits"));
            }
            value |= low << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(ChunkError::Malformed("LEB128 number over 64 bits"))
    }

    fn sleb(&mut self, what: &'static str) -> Result<i64, ChunkError> {
        let mut value: i64 = 0;
        let mut shift = 0;
        loop {
            let byte = *self.bytes.get(self.at).ok_or(ChunkError::Truncated(what))?;
            self.at += 1;
            if shift >= 64 {
                return Err(ChunkError::Malformed("LEB128 number over 64 bits"));
            }
            value |= i64::from(byte & 0x7f).wrapping_shl(shift);
            shift += 7;
            if byte & 0x80 == 0 {
                if shift < 64 && byte & 0x40 != 0 {
                    value |= -1i64 << shift;
                }
                return Ok(value);
            }
        }
    }

    fn bounded(&mut self, what: &'static str, max: u64) -> Result<u64, ChunkError> {
        let got = self.uleb(what)?;
        if got > max {
            return Err(ChunkError::OverLimit { what, got, max });
        }
        Ok(got)
    }
}

pub(crate) fn uleb_bytes(mut n: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

impl ChangeHeader {
    /// Read the envelope and header of `bytes`, which must be exactly one uncompressed change
    /// chunk of at most [`MAX_CHANGE_BYTES`] whose checksum matches its hash.
    pub fn parse(bytes: &[u8]) -> Result<ChangeHeader, ChunkError> {
        if bytes.len() > MAX_CHANGE_BYTES {
            return Err(ChunkError::TooLarge {
                got: bytes.len(),
                max: MAX_CHANGE_BYTES,
            });
        }
        let mut r = Reader::new(bytes);
        if r.take(4, "magic")? != MAGIC {
            return Err(ChunkError::Magic);
        }
        let checksum = r.take(4, "checksum")?;
        let ty = r.take(1, "chunk type")?[0];
        match ty {
            CHUNK_CHANGE => {}
            CHUNK_COMPRESSED => return Err(ChunkError::Compressed),
            other => return Err(ChunkError::NotAChange(other)),
        }
        let len = r.uleb("chunk length")?;
        let body_start = r.at;
        let body = r.take(len, "chunk body")?;
        if !r.done() {
            return Err(ChunkError::Trailing(bytes.len() - r.at));
        }
        let mut hasher = Sha256::new();
        let mut prefix = vec![ty];
        uleb_bytes(len, &mut prefix);
        hasher.update(&prefix);
        hasher.update(body);
        let hash: [u8; 32] = hasher.finalize().into();
        if checksum != &hash[..4] {
            return Err(ChunkError::Checksum);
        }

        let mut r = Reader::new(body);
        let n_deps = r.bounded("dependencies", MAX_DEPS_PER_CHANGE)?;
        let mut deps = Vec::with_capacity(n_deps as usize);
        for _ in 0..n_deps {
            let d = r.take(32, "dependency hash")?;
            let mut h = [0u8; 32];
            h.copy_from_slice(d);
            deps.push(h);
        }
        let actor_len = r.bounded("actor id bytes", MAX_ACTOR_BYTES)?;
        let actor = r.take(actor_len, "actor id")?.to_vec();
        let seq = r.uleb("seq")?;
        let start_op = r.uleb("start op")?;
        if start_op == 0 || start_op > MAX_COUNTER {
            return Err(ChunkError::Malformed("start op out of range"));
        }
        r.sleb("time")?;
        let message_len = r.uleb("message length")?;
        let message = r.take(message_len, "message")?;
        if std::str::from_utf8(message).is_err() {
            return Err(ChunkError::Malformed("message is not UTF-8"));
        }
        let other_actors = r.bounded("other actors", MAX_OTHER_ACTORS_PER_CHANGE)?;
        for _ in 0..other_actors {
            let n = r.bounded("actor id bytes", MAX_ACTOR_BYTES)?;
            r.take(n, "other actor id")?;
        }
        let n_cols = r.bounded("op columns", MAX_COLUMNS_PER_CHANGE)?;
        let mut specs = Vec::with_capacity(n_cols as usize);
        for _ in 0..n_cols {
            let spec = r.uleb("column spec")?;
            let spec = u32::try_from(spec).map_err(|_| ChunkError::Malformed("column spec"))?;
            let len = r.uleb("column length")?;
            specs.push((spec, len));
        }
        let mut columns = Vec::with_capacity(specs.len());
        for (spec, len) in specs {
            if spec & 0x08 != 0 {
                return Err(ChunkError::Compressed);
            }
            let start = body_start + r.at;
            r.take(len, "column data")?;
            columns.push((spec, start..start + len as usize));
        }
        Ok(ChangeHeader {
            hash,
            deps,
            actor,
            seq,
            start_op,
            other_actors,
            columns,
        })
    }

    /// Walk every op column of `bytes` (the chunk this header was read from) and check that no
    /// column describes more than [`MAX_OPS_PER_CHANGE`] values, that counters fit Automerge's
    /// 32 bits, that actor indices name an actor of the change, and that the value columns
    /// hold the bytes their metadata claims. Returns the number of ops. Linear in the bytes
    /// present, whatever the counts they claim.
    pub fn check_ops(&self, bytes: &[u8]) -> Result<u64, ChunkError> {
        let mut ops = 0;
        for (spec, range) in &self.columns {
            let data = bytes
                .get(range.clone())
                .ok_or(ChunkError::Truncated("column data"))?;
            let rows = match spec & 0x07 {
                // Group cardinalities: their sum is how many values the grouped columns hold.
                0 => walk_rle(data, Value::Uleb, |v| {
                    bound(v, MAX_OPS_PER_CHANGE, "group size")
                })?,
                1 => walk_rle(data, Value::Uleb, |v| {
                    bound(v, self.other_actors, "actor index")
                })?,
                2 => walk_rle(data, Value::Uleb, |v| bound(v, MAX_COUNTER, "counter"))?,
                3 => walk_delta(data)?,
                4 => walk_bool(data)?,
                5 => walk_rle(data, Value::Str, |_| Ok(()))?,
                6 => walk_rle(data, Value::Uleb, |_| Ok(()))?,
                _ => 0,
            };
            if spec >> 4 == ACTION_COLUMN_ID && spec & 0x07 == 2 {
                ops = rows;
            }
        }
        if self.start_op.saturating_add(ops) > MAX_COUNTER {
            return Err(ChunkError::OverLimit {
                what: "last op counter",
                got: self.start_op.saturating_add(ops),
                max: MAX_COUNTER,
            });
        }
        Ok(ops)
    }
}

/// The id of the action column: one value per op.
const ACTION_COLUMN_ID: u32 = 4;

#[derive(Clone, Copy)]
enum Value {
    Uleb,
    Str,
}

fn bound(v: u64, max: u64, what: &'static str) -> Result<(), ChunkError> {
    if v > max {
        return Err(ChunkError::OverLimit { what, got: v, max });
    }
    Ok(())
}

/// Add `n` rows to `rows`, refusing a column of more than [`MAX_OPS_PER_CHANGE`] values.
fn add_rows(rows: &mut u64, n: u64) -> Result<(), ChunkError> {
    *rows = rows.saturating_add(n);
    if *rows > MAX_OPS_PER_CHANGE {
        return Err(ChunkError::OverLimit {
            what: "values in one op column",
            got: *rows,
            max: MAX_OPS_PER_CHANGE,
        });
    }
    Ok(())
}

/// Count the values of an RLE column, handing each distinct value to `check`.
fn walk_rle(
    data: &[u8],
    value: Value,
    mut check: impl FnMut(u64) -> Result<(), ChunkError>,
) -> Result<u64, ChunkError> {
    let mut r = Reader::new(data);
    let mut rows = 0;
    let mut read_value = |r: &mut Reader<'_>| -> Result<(), ChunkError> {
        match value {
            Value::Uleb => check(r.uleb("column value")?),
            Value::Str => {
                let n = r.uleb("string length")?;
                let s = r.take(n, "string")?;
                std::str::from_utf8(s).map_err(|_| ChunkError::Malformed("string is not UTF-8"))?;
                Ok(())
            }
        }
    };
    while !r.done() {
        let n = r.sleb("run length")?;
        if n > 0 {
            add_rows(&mut rows, n as u64)?;
            read_value(&mut r)?;
        } else if n < 0 {
            let n = n.unsigned_abs();
            add_rows(&mut rows, n)?;
            for _ in 0..n {
                read_value(&mut r)?;
            }
        } else {
            let nulls = r.uleb("null run")?;
            add_rows(&mut rows, nulls)?;
        }
    }
    Ok(rows)
}

/// Count the values of a delta column, checking that every absolute value is a counter.
fn walk_delta(data: &[u8]) -> Result<u64, ChunkError> {
    let mut r = Reader::new(data);
    let mut rows = 0;
    let mut at: i128 = 0;
    let step = |at: &mut i128, delta: i64, times: u64| -> Result<(), ChunkError> {
        *at += i128::from(delta) * i128::from(times);
        if !(0..=i128::from(MAX_COUNTER)).contains(at) {
            return Err(ChunkError::OverLimit {
                what: "counter",
                got: (*at).clamp(0, i128::from(u64::MAX)) as u64,
                max: MAX_COUNTER,
            });
        }
        Ok(())
    };
    while !r.done() {
        let n = r.sleb("run length")?;
        if n > 0 {
            add_rows(&mut rows, n as u64)?;
            let d = r.sleb("delta")?;
            step(&mut at, d, n as u64)?;
        } else if n < 0 {
            let n = n.unsigned_abs();
            add_rows(&mut rows, n)?;
            for _ in 0..n {
                let d = r.sleb("delta")?;
                step(&mut at, d, 1)?;
            }
        } else {
            let nulls = r.uleb("null run")?;
            add_rows(&mut rows, nulls)?;
        }
    }
    Ok(rows)
}

/// Count the values of a boolean column.
fn walk_bool(data: &[u8]) -> Result<u64, ChunkError> {
    let mut r = Reader::new(data);
    let mut rows = 0;
    while !r.done() {
        let n = r.uleb("boolean run")?;
        add_rows(&mut rows, n)?;
    }
    Ok(rows)
}

#[cfg(test)]
mod tests;
