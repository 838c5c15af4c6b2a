//! The kinds of failure the API, the CLI and its client report, and the one place that says how
//! each is shown: its HTTP status and its process exit code.

use crate::bundle::BundleError;
use crate::core::PeerError;
use crate::core::{LocalWriteError, ReadError};
use crate::held::HeldError;
use crate::node::CallError;
use crate::replica::engine::WriteError;

/// What went wrong, as the caller needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The object, peer or document named does not exist.
    NotFound,
    /// The request itself is wrong (a bad field, a bad name, a bad policy).
    Invalid,
    /// The request is well formed but its content is refused (a bundle that fails a check).
    Unprocessable,
    /// Policy forbids it (a read-only type).
    Forbidden,
    /// The node is stopping or stopped.
    Unavailable,
    /// This node failed (its disk, its store): nobody's request was wrong.
    Internal,
}

impl ErrorKind {
    /// The HTTP status the API answers with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::NotFound => 404,
            ErrorKind::Invalid => 400,
            ErrorKind::Unprocessable => 422,
            ErrorKind::Forbidden => 403,
            ErrorKind::Unavailable => 503,
            ErrorKind::Internal => 500,
        }
    }

    /// The kind an API answer's status stands for (the CLI talking to a running node).
    pub fn from_http_status(status: u16) -> ErrorKind {
        match status {
            404 => ErrorKind::NotFound,
            403 => ErrorKind::Forbidden,
            422 => ErrorKind::Unprocessable,
            503 => ErrorKind::Unavailable,
            400..=499 => ErrorKind::Invalid,
            _ => ErrorKind::Internal,
        }
    }

    /// The CLI's exit code: 3 for something missing, 4 for a write refused by policy, 1
    /// otherwise (2, for usage, is the CLI's own).
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::NotFound => 3,
            ErrorKind::Forbidden => 4,
            _ => 1,
        }
    }
}

/// An operation's error that can say which [`ErrorKind`] it is.
pub trait Kind: std::fmt::Display {
    fn kind(&self) -> ErrorKind;
}

impl Kind for LocalWriteError {
    fn kind(&self) -> ErrorKind {
        match self {
            LocalWriteError::Refused(WriteError::NotFound { .. }) => ErrorKind::NotFound,
            LocalWriteError::Refused(WriteError::Resolve { source, .. }) => match **source {
                crate::concurrent::ResolveError::NoField(_) => ErrorKind::NotFound,
                crate::concurrent::ResolveError::NotConcurrent { .. }
                | crate::concurrent::ResolveError::NoValue { .. } => ErrorKind::Unprocessable,
                _ => ErrorKind::Invalid,
            },
            LocalWriteError::Refused(WriteError::Fields { .. })
            | LocalWriteError::BadId { .. }
            | LocalWriteError::BadFileRef { .. } => ErrorKind::Invalid,
            LocalWriteError::ReadOnly { .. } | LocalWriteError::Reserved { .. } => {
                ErrorKind::Forbidden
            }
            LocalWriteError::Store { .. } => ErrorKind::Internal,
        }
    }
}

impl Kind for crate::core::RenameError {
    fn kind(&self) -> ErrorKind {
        use crate::core::RenameError as E;
        match self {
            E::NotFound { .. } => ErrorKind::NotFound,
            E::BadName { .. } => ErrorKind::Invalid,
            E::Taken { .. } | E::Published { .. } => ErrorKind::Unprocessable,
            E::Store { .. } => ErrorKind::Internal,
        }
    }
}

impl Kind for ReadError {
    fn kind(&self) -> ErrorKind {
        match self {
            ReadError::NotFound { .. } => ErrorKind::NotFound,
            ReadError::Store { .. } => ErrorKind::Internal,
        }
    }
}

impl Kind for BundleError {
    fn kind(&self) -> ErrorKind {
        match self {
            BundleError::UnknownPeer { .. } => ErrorKind::NotFound,
            BundleError::Store { .. } | BundleError::Sync(_) | BundleError::Encrypt { .. } => {
                ErrorKind::Internal
            }
            _ => ErrorKind::Unprocessable,
        }
    }
}

impl Kind for crate::replica::plan::PlanError {
    fn kind(&self) -> ErrorKind {
        match self {
            crate::replica::plan::PlanError::UnknownPeer { .. } => ErrorKind::NotFound,
            crate::replica::plan::PlanError::Store { .. } => ErrorKind::Internal,
        }
    }
}

impl Kind for HeldError {
    fn kind(&self) -> ErrorKind {
        match self {
            HeldError::UnknownPeer(_) => ErrorKind::NotFound,
            HeldError::Invalid(_) => ErrorKind::Invalid,
            HeldError::Read(r) => r.kind(),
        }
    }
}

impl Kind for crate::store::FileError {
    fn kind(&self) -> ErrorKind {
        match self {
            crate::store::FileError::NotFound(_) => ErrorKind::NotFound,
            crate::store::FileError::TooLarge => ErrorKind::Invalid,
            _ => ErrorKind::Internal,
        }
    }
}

impl Kind for PeerError {
    fn kind(&self) -> ErrorKind {
        match self {
            PeerError::Invalid(_) => ErrorKind::Invalid,
            PeerError::Unknown(_) => ErrorKind::NotFound,
            PeerError::Save(_) | PeerError::Store { .. } => ErrorKind::Internal,
        }
    }
}

impl<E: Kind> Kind for CallError<E> {
    fn kind(&self) -> ErrorKind {
        match self {
            CallError::Stopped => ErrorKind::Unavailable,
            CallError::Failed(e) => e.kind(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_survives_the_trip_through_http() {
        for kind in [
            ErrorKind::NotFound,
            ErrorKind::Invalid,
            ErrorKind::Unprocessable,
            ErrorKind::Forbidden,
            ErrorKind::Unavailable,
            ErrorKind::Internal,
        ] {
            assert_eq!(ErrorKind::from_http_status(kind.http_status()), kind);
        }
    }
}
