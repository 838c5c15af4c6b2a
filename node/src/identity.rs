//! The node's ed25519 identity: the key file, and the ids, actor and libp2p keypair derived from it.
//!
//! Key file format (`HOME/identity.key`, mode 0600): the line `tidesync-ed25519-secret-v1`,
//! then the 32-byte secret key as 64 lowercase hex digits, then a newline.

use std::fs;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use tidesync_proto::NodeId;

use crate::atomic::write_atomic;

const KEY_FILE_HEADER: &str = "tidesync-ed25519-secret-v1";

/// Why the key file could not be created or read. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {file}: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "key file {file} is not a tidesync key ({reason}); restore it from a backup, or run `tidesync init` in a new home"
    )]
    Invalid { file: PathBuf, reason: String },
    #[error("key file {file} is readable by other users (mode {mode:o}); run `chmod 600 {file}`")]
    Permissions { file: PathBuf, mode: u32 },
    #[error("cannot write key file {file}: {source}")]
    Write {
        file: PathBuf,
        source: std::io::Error,
    },
}

/// A node's signing key and the identities derived from it.
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
    node: NodeId,
    /// The HMAC key of [`Identity::checkpoint_token`], derived from the secret once.
    checkpoint_key: [u8; 32],
}

impl Identity {
    pub fn from_secret(secret: [u8; 32]) -> Identity {
        use sha2::Digest;
        let key = SigningKey::from_bytes(&secret);
        let node = NodeId(key.verifying_key().to_bytes());
        let mut h = sha2::Sha256::new();
        h.update(b"tidesync/checkpoint-key/v1\0");
        h.update(secret);
        Identity {
            key,
            node,
            checkpoint_key: h.finalize().into(),
        }
    }

    /// A fresh key from `rng`.
    pub fn generate(rng: &mut impl rand::Rng) -> Identity {
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        Identity::from_secret(secret)
    }

    pub fn node_id(&self) -> NodeId {
        self.node
    }

    pub fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    /// The checkpoint of our log entry `seq`, whose change hash is `hash`, as `peer` sees it:
    /// HMAC-SHA-256 under a key derived from our secret, over the peer, the SEQ and the hash.
    /// A peer holds our log up to such a token and hands it back to resume; it never learns
    /// the hash of an entry it may not receive (the change behind a `--fields` view, a
    /// skipped type), nor can it test a guess of one, and a token means nothing to any other
    /// peer. A node restored from an older copy has other hashes at those SEQs, so the
    /// tokens its peers hold no longer match and they start over.
    pub fn checkpoint_token(&self, peer: &NodeId, seq: u64, hash: &[u8; 32]) -> [u8; 32] {
        use hmac::{KeyInit, Mac};
        let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&self.checkpoint_key)
            .expect("HMAC takes a key of any length");
        mac.update(&peer.0);
        mac.update(&seq.to_be_bytes());
        mac.update(hash);
        mac.finalize().into_bytes().into()
    }

    /// The same key as a libp2p keypair, so the node's PeerId is its [`NodeId`].
    pub fn libp2p_keypair(&self) -> libp2p::identity::Keypair {
        let mut secret = self.key.to_bytes();
        libp2p::identity::Keypair::ed25519_from_bytes(&mut secret)
            .expect("a 32-byte ed25519 secret is always a valid libp2p key")
    }

    /// Write the key file with mode 0600. Refuses to overwrite an existing file.
    pub fn save(&self, file: &Path) -> Result<(), KeyError> {
        if file.exists() {
            return Err(KeyError::Write {
                file: file.into(),
                source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "file exists"),
            });
        }
        let text = format!("{KEY_FILE_HEADER}\n{}\n", hex::encode(self.key.to_bytes()));
        write_atomic(file, text.as_bytes(), 0o600).map_err(|source| KeyError::Write {
            file: file.into(),
            source,
        })
    }

    /// Read the key file, refusing one that others can read or that is malformed.
    pub fn load(file: &Path) -> Result<Identity, KeyError> {
        let text = fs::read(file).map_err(|source| KeyError::Read {
            file: file.into(),
            source,
        })?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(file)
                .map_err(|source| KeyError::Read {
                    file: file.into(),
                    source,
                })?
                .permissions()
                .mode()
                & 0o777;
            if mode & 0o077 != 0 {
                return Err(KeyError::Permissions {
                    file: file.into(),
                    mode,
                });
            }
        }
        let invalid = |reason: &str| KeyError::Invalid {
            file: file.into(),
            reason: reason.into(),
        };
        let text = std::str::from_utf8(&text).map_err(|_| invalid("not text"))?;
        let mut lines = text.lines();
        if lines.next() != Some(KEY_FILE_HEADER) {
            return Err(invalid("missing header line"));
        }
        let hex_key = lines.next().ok_or_else(|| invalid("missing key line"))?;
        let mut secret = [0u8; 32];
        hex::decode_to_slice(hex_key.trim(), &mut secret)
            .map_err(|_| invalid("key line is not 64 hex digits"))?;
        Ok(Identity::from_secret(secret))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_round_trips_with_private_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("identity.key");
        let id = Identity::from_secret([9; 32]);
        id.save(&file).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(Identity::load(&file).unwrap().node_id(), id.node_id());
        assert!(id.save(&file).is_err(), "must not overwrite a key");
        assert_eq!(
            id.libp2p_keypair().public().to_peer_id().to_string(),
            id.node_id().to_string()
        );
    }

    #[test]
    fn damaged_or_exposed_key_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("identity.key");
        fs::write(&file, "garbage").unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            Identity::load(&file),
            Err(KeyError::Invalid { .. })
        ));
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Identity::load(&file),
            Err(KeyError::Permissions { .. })
        ));
    }
}
