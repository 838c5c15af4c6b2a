//! Hand-made change chunks for tests that attack: correctly framed, checksummed and signed,
//! with whatever op columns the attacker chooses (only with the `fault-injection` feature).

use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};

use crate::change::{SignedChange, signing_message};
use crate::chunk::{CHUNK_CHANGE, CHUNK_COMPRESSED, ChangeHeader, MAGIC, uleb_bytes};
use crate::ids::DocId;

/// Append `n` as a signed LEB128 number.
pub fn sleb(mut n: i64, out: &mut Vec<u8>) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        let done = (n == 0 && byte & 0x40 == 0) || (n == -1 && byte & 0x40 != 0);
        out.push(if done { byte } else { byte | 0x80 });
        if done {
            return;
        }
    }
}

/// Append `n` as an unsigned LEB128 number.
pub fn uleb(n: u64, out: &mut Vec<u8>) {
    uleb_bytes(n, out)
}

/// An RLE run of `n` copies of `value` (a null run when `n` is 0, then `value` counts nulls).
pub fn run(n: i64, value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    sleb(n, &mut out);
    uleb(value, &mut out);
    out
}

/// Op columns: (column spec, data).
pub type Columns = Vec<(u32, Vec<u8>)>;

/// The action column's spec (id 4, uLEB): one value per op.
pub const ACTION: u32 = 4 << 4 | 2;

/// Op columns naming an object counter of 2^32, which panicked Automerge 0.12.
pub fn counter_bomb() -> Columns {
    vec![(1, run(1, 0)), (2, run(1, 1 << 32)), (ACTION, run(1, 1))]
}

/// An action column claiming a run of 2^62 ops, on which Automerge 0.12 looped for ever.
pub fn op_count_bomb() -> Columns {
    vec![(ACTION, run(1 << 62, 1))]
}

/// An action column claiming 2^50 null ops.
pub fn null_run_bomb() -> Columns {
    vec![(ACTION, run(0, 1 << 50))]
}

/// A single op: a well-formed header with one action.
pub fn one_op() -> Columns {
    vec![(ACTION, run(1, 1))]
}

/// A change chunk by `actor` with dependencies `deps` and the op columns `(spec, data)`,
/// seq 1 and start op 1; chunk type 2 (compressed) when `compressed`.
pub fn chunk(
    actor: &[u8],
    deps: &[[u8; 32]],
    columns: &[(u32, Vec<u8>)],
    compressed: bool,
) -> Vec<u8> {
    let mut body = Vec::new();
    uleb(deps.len() as u64, &mut body);
    for d in deps {
        body.extend_from_slice(d);
    }
    uleb(actor.len() as u64, &mut body);
    body.extend_from_slice(actor);
    uleb(1, &mut body); // seq
    uleb(1, &mut body); // start op
    sleb(0, &mut body); // time
    uleb(0, &mut body); // message
    uleb(0, &mut body); // other actors
    uleb(columns.len() as u64, &mut body);
    for (spec, data) in columns {
        uleb(u64::from(*spec), &mut body);
        uleb(data.len() as u64, &mut body);
    }
    for (_, data) in columns {
        body.extend_from_slice(data);
    }
    let ty = if compressed {
        CHUNK_COMPRESSED
    } else {
        CHUNK_CHANGE
    };
    let mut prefix = vec![ty];
    uleb(body.len() as u64, &mut prefix);
    let hash: [u8; 32] = Sha256::new()
        .chain_update(&prefix)
        .chain_update(&body)
        .finalize()
        .into();
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&hash[..4]);
    out.extend_from_slice(&prefix);
    out.extend_from_slice(&body);
    out
}

/// `bytes` (a well-framed chunk) signed by `key` for document `doc`.
pub fn sign(key: &SigningKey, doc: DocId, bytes: Vec<u8>) -> SignedChange {
    let hash = ChangeHeader::parse(&bytes)
        .map(|h| h.hash)
        .unwrap_or_default();
    let signature = key
        .sign(&signing_message(&doc, &automerge::ChangeHash(hash)))
        .to_bytes();
    SignedChange {
        doc,
        bytes,
        signature,
    }
}
