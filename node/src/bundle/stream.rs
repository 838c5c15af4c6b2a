//! Writing and reading the bundle format (see [`super`]): the header, the sealed and compressed
//! records, then the files, as one stream through age; nothing holds a whole file in memory.

use std::io::{BufReader, Read, Write};

use ed25519_dalek::{Signature, Signer, Verifier, VerifyingKey};
use tidesync_proto::NodeId;
use tidesync_proto::wire::ZSTD_LEVEL;

use super::{
    BUNDLE_FORMAT_VERSION, BUNDLE_HEADER_BYTES, BUNDLE_MAGIC, BUNDLE_SIGNING_DOMAIN, BundleBody,
    BundleError, BundleFile, FLAG_ENCRYPTED, MAX_BUNDLE_FILES, MAX_BUNDLE_RECORDS_BYTES, Sealed,
    age_identity, age_recipient,
};
use crate::files::MAX_FILE_BYTES;
use crate::identity::Identity;

/// Copies one file's bytes into a bundle being written.
pub type CopyFile<'f> = dyn FnMut(&BundleFile, &mut dyn Write) -> Result<(), BundleError> + 'f;

/// The cleartext header.
fn header(flags: u8, from: &NodeId, to: &NodeId) -> Vec<u8> {
    let mut h = Vec::with_capacity(BUNDLE_HEADER_BYTES);
    h.extend_from_slice(BUNDLE_MAGIC);
    h.extend_from_slice(&BUNDLE_FORMAT_VERSION.to_be_bytes());
    h.push(flags);
    h.extend_from_slice(&from.0);
    h.extend_from_slice(&to.0);
    h
}

fn signed_bytes(header: &[u8], body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(BUNDLE_SIGNING_DOMAIN.len() + header.len() + body.len());
    m.extend_from_slice(BUNDLE_SIGNING_DOMAIN);
    m.extend_from_slice(header);
    m.extend_from_slice(body);
    m
}

/// Write the bundle of `body` to `out`, signed as `identity` and, when `encrypt`, encrypted to
/// `body.to`; `copy_file` writes each file `body.files` lists, in order. Returns `out`.
pub fn write<W: Write>(
    identity: &Identity,
    body: &BundleBody,
    encrypt: bool,
    out: W,
    copy_file: &mut CopyFile<'_>,
) -> Result<W, BundleError> {
    let to = body.to;
    let encoded = postcard::to_stdvec(body).map_err(|e| BundleError::Encrypt {
        to,
        detail: e.to_string(),
    })?;
    write_encoded(
        identity,
        &to,
        &encoded,
        encrypt,
        &body.files,
        out,
        copy_file,
    )
}

/// Write a bundle whose body is exactly the bytes `encoded` (the postcard encoding of a
/// [`BundleBody`] listing `files`), as [`write`] does. The fuzzing targets seal raw bodies
/// through it.
pub fn write_encoded<W: Write>(
    identity: &Identity,
    to: &NodeId,
    encoded: &[u8],
    encrypt: bool,
    files: &[BundleFile],
    mut out: W,
    copy_file: &mut CopyFile<'_>,
) -> Result<W, BundleError> {
    let to = *to;
    let failed = |detail: String| BundleError::Encrypt { to, detail };
    let written = |source| BundleError::Write { to, source };
    let head = header(
        if encrypt { FLAG_ENCRYPTED } else { 0 },
        &identity.node_id(),
        &to,
    );
    let signature = identity
        .signing_key()
        .sign(&signed_bytes(&head, encoded))
        .to_bytes();
    let sealed = postcard::to_stdvec(&Sealed {
        body: encoded.to_vec(),
        signature,
    })
    .map_err(|e| failed(e.to_string()))?;
    let compressed =
        zstd::bulk::compress(&sealed, ZSTD_LEVEL).map_err(|e| failed(e.to_string()))?;
    for len in [sealed.len(), compressed.len()] {
        if len as u64 > MAX_BUNDLE_RECORDS_BYTES {
            return Err(BundleError::TooLarge { len: len as u64 });
        }
    }
    out.write_all(&head).map_err(written)?;
    let mut payload = |w: &mut dyn Write| -> Result<(), BundleError> {
        w.write_all(&(compressed.len() as u64).to_be_bytes())
            .and_then(|()| w.write_all(&(sealed.len() as u64).to_be_bytes()))
            .and_then(|()| w.write_all(&compressed))
            .map_err(written)?;
        for file in files {
            copy_file(file, w)?;
        }
        Ok(())
    };
    if encrypt {
        let recipient = age_recipient(&to).map_err(failed)?;
        let encryptor =
            age::Encryptor::with_recipients(std::iter::once(&recipient as &dyn age::Recipient))
                .map_err(|e| failed(e.to_string()))?;
        let mut w = encryptor.wrap_output(out).map_err(written)?;
        payload(&mut w)?;
        out = w.finish().map_err(written)?;
    } else {
        payload(&mut out)?;
    }
    out.flush().map_err(written)?;
    Ok(out)
}

/// Seal `body` as `identity` and, when `encrypt`, encrypt it to `body.to`: the bundle's bytes.
/// For bundles without files (a body listing files needs [`write`] with a copier).
pub fn seal(identity: &Identity, body: &BundleBody, encrypt: bool) -> Result<Vec<u8>, BundleError> {
    write(identity, body, encrypt, Vec::new(), &mut |f, _| {
        Err(BundleError::Encrypt {
            to: body.to,
            detail: format!("file {} has no source to be copied from", f.hash),
        })
    })
}

/// A bundle whose header, records and signature were checked: its body, and its files still
/// to be read, in order.
pub struct Opened<'a> {
    pub body: BundleBody,
    payload: Box<dyn Read + Send + 'a>,
}

/// Read as much of `buf` as `src` has: the bytes read.
fn read_full(src: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match src.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Open a bundle addressed to `identity` from `src`: check the header, decrypt, read and
/// decompress the records, check the exporter's signature and decode them. The files are
/// left to [`Opened::each_file`]. `exporter_known` says whether an exporter is a configured
/// peer.
pub fn open_stream<'a>(
    identity: &Identity,
    mut src: impl Read + Send + 'a,
    exporter_known: impl Fn(&NodeId) -> bool,
) -> Result<Opened<'a>, BundleError> {
    let me = identity.node_id();
    let mut head = [0u8; BUNDLE_HEADER_BYTES];
    let n = read_full(&mut src, &mut head).map_err(BundleError::Read)?;
    if n < BUNDLE_MAGIC.len() + 2 || &head[..BUNDLE_MAGIC.len()] != BUNDLE_MAGIC {
        return Err(BundleError::NotABundle);
    }
    let version = u16::from_be_bytes([head[16], head[17]]);
    if version != BUNDLE_FORMAT_VERSION {
        return Err(BundleError::Version { got: version });
    }
    if n < BUNDLE_HEADER_BYTES {
        return Err(BundleError::Truncated { part: "header" });
    }
    let key = |at: usize| {
        let mut k = [0u8; 32];
        k.copy_from_slice(&head[at..at + 32]);
        NodeId(k)
    };
    let (from, to) = (key(19), key(51));
    if to != me {
        return Err(BundleError::WrongRecipient { to, me });
    }
    if !exporter_known(&from) {
        return Err(BundleError::UnknownExporter { from });
    }
    let damaged = |detail: String| BundleError::Damaged { from, detail };
    let mut payload: Box<dyn Read + Send + 'a> = if head[18] & FLAG_ENCRYPTED != 0 {
        let decrypt = |e: age::DecryptError| match e {
            age::DecryptError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                BundleError::Truncated {
                    part: "encryption header",
                }
            }
            e => BundleError::Decrypt {
                from,
                detail: e.to_string().lines().next().unwrap_or_default().to_string(),
            },
        };
        let key = age_identity(identity).map_err(|detail| BundleError::Decrypt { from, detail })?;
        let decryptor = age::Decryptor::new_buffered(BufReader::new(src)).map_err(decrypt)?;
        Box::new(Authenticated(
            decryptor
                .decrypt(std::iter::once(&key as &dyn age::Identity))
                .map_err(decrypt)?,
        ))
    } else {
        Box::new(src)
    };
    let read_err = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => BundleError::Truncated { part: "payload" },
        _ => damaged(format!("reading the payload: {e}")),
    };
    let mut lens = [0u8; 16];
    if read_full(&mut payload, &mut lens).map_err(read_err)? < lens.len() {
        return Err(BundleError::Truncated { part: "records" });
    }
    let (z, n) = (
        u64::from_be_bytes(lens[..8].try_into().unwrap_or_default()),
        u64::from_be_bytes(lens[8..].try_into().unwrap_or_default()),
    );
    for len in [z, n] {
        if len > MAX_BUNDLE_RECORDS_BYTES {
            return Err(BundleError::TooLarge { len });
        }
    }
    // Read as the bytes arrive, so that a header claiming gigabytes allocates nothing.
    let mut compressed = Vec::new();
    (&mut payload)
        .take(z)
        .read_to_end(&mut compressed)
        .map_err(read_err)?;
    if compressed.len() as u64 != z {
        return Err(BundleError::Truncated { part: "records" });
    }
    let mut sealed = Vec::new();
    zstd::stream::read::Decoder::new(&compressed[..])
        .map_err(|e| damaged(e.to_string()))?
        .take(n.saturating_add(1))
        .read_to_end(&mut sealed)
        .map_err(|e| damaged(format!("decompressing the records: {e}")))?;
    if sealed.len() as u64 != n {
        return Err(damaged(
            "the records are not as long as the bundle says".into(),
        ));
    }
    drop(compressed);
    let sealed: Sealed = postcard::from_bytes(&sealed).map_err(|e| damaged(e.to_string()))?;
    let key = VerifyingKey::from_bytes(&from.0).map_err(|e| damaged(e.to_string()))?;
    key.verify(
        &signed_bytes(&head, &sealed.body),
        &Signature::from_bytes(&sealed.signature),
    )
    .map_err(|_| damaged("the exporter's signature does not verify".into()))?;
    let body: BundleBody =
        postcard::from_bytes(&sealed.body).map_err(|e| damaged(e.to_string()))?;
    if body.from != from || body.to != to {
        return Err(damaged("the body names other nodes than the header".into()));
    }
    if body.files.len() > MAX_BUNDLE_FILES || body.wants.len() > MAX_BUNDLE_FILES {
        return Err(damaged(format!(
            "it lists {} files and wants {}, over the limit of {MAX_BUNDLE_FILES}",
            body.files.len(),
            body.wants.len()
        )));
    }
    if let Some(f) = body.files.iter().find(|f| f.size > MAX_FILE_BYTES) {
        return Err(damaged(format!(
            "file {} of {} bytes is over the limit of {MAX_FILE_BYTES}",
            f.hash, f.size
        )));
    }
    Ok(Opened { body, payload })
}

/// An age payload being read: a chunk that does not authenticate says what that means here.
struct Authenticated<R>(R);

impl<R: Read> Read for Authenticated<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => std::io::Error::new(
                e.kind(),
                format!("the encrypted payload does not authenticate: the bundle was truncated or altered ({e})"),
            ),
            _ => e,
        })
    }
}

impl Opened<'_> {
    /// Hand each file the body lists to `take`, in order, with a reader of exactly its bytes
    /// (`take` may leave them unread: they are skipped); then check that nothing follows the
    /// last file. A file that ends early is an error.
    pub fn each_file(
        &mut self,
        mut take: impl FnMut(&BundleFile, &mut dyn Read) -> Result<(), BundleError>,
    ) -> Result<(), BundleError> {
        let from = self.body.from;
        let damaged = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => BundleError::Truncated { part: "files" },
            _ => BundleError::Damaged {
                from,
                detail: format!("reading its files: {e}"),
            },
        };
        for file in &self.body.files {
            let mut part = (&mut self.payload).take(file.size);
            take(file, &mut part)?;
            std::io::copy(&mut part, &mut std::io::sink()).map_err(damaged)?;
            if part.limit() > 0 {
                return Err(BundleError::Truncated { part: "files" });
            }
        }
        let mut one = [0u8; 1];
        if read_full(&mut self.payload, &mut one).map_err(damaged)? > 0 {
            return Err(BundleError::Damaged {
                from,
                detail: "bytes follow its last file".into(),
            });
        }
        Ok(())
    }
}
