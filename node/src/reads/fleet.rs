//! The fleet view: every node this one has heard of (by status record or bundle), offline
//! ones included, with the age of what it knows.

use serde::{Deserialize, Serialize};
use tidesync_proto::fleet::StatusRecord;

use super::{ReadError, Reads, read_err};

/// One node of the fleet as this node knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetNode {
    /// Its node id (PeerId) and key fingerprint.
    pub id: String,
    pub fingerprint: String,
    /// Its name: the configured peer name here, or the name it gives itself.
    pub name: String,
    /// When its last status record arrived here, and through which peer (PeerId).
    pub heard_ms: Option<i64>,
    pub via: Option<String>,
    /// When a bundle from it was last imported here.
    pub bundle_ms: Option<i64>,
    /// Its last status record: its peers, lag, held changes, refusals, wanted files, store
    /// size and version, as of `record.made_ms`.
    pub record: Option<StatusRecord>,
}

impl Reads {
    /// Every node in the fleet table; `names` gives the configured peers' names.
    pub fn fleet(
        &self,
        names: &dyn Fn(&tidesync_proto::NodeId) -> Option<String>,
    ) -> Result<Vec<FleetNode>, ReadError> {
        let rows = self.store.fleet().map_err(read_err("the fleet table"))?;
        let mut out: Vec<FleetNode> = rows
            .into_iter()
            .map(|(id, row)| FleetNode {
                id: id.to_string(),
                fingerprint: id.fingerprint(),
                name: names(&id)
                    .or_else(|| row.record.as_ref().map(|r| r.name.clone()))
                    .unwrap_or_else(|| id.short()),
                heard_ms: row.record.as_ref().map(|_| row.heard_ms),
                via: row.via.map(|v| v.to_string()),
                bundle_ms: row.bundle_ms,
                record: row.record,
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        Ok(out)
    }
}
