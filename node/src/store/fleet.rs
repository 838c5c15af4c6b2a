//! The fleet table: the last status record heard from each node (replaced, never kept as a
//! history) and when a bundle from it last arrived; and each peer's meter of bytes sent today
//! (its daily budget).

use super::*;
use tidesync_proto::fleet::StatusRecord;

/// What this node knows of one other node.
/// Key: its NodeId. Value: postcard [`FleetRow`].
pub(super) const FLEET: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("fleet_v1");

/// Most nodes the fleet table holds; records of further nodes are refused.
pub const MAX_FLEET_NODES: u64 = 1_024;

/// One node as this node last heard of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct FleetRow {
    /// Its last status record (verified when it arrived).
    pub record: Option<StatusRecord>,
    /// When that record arrived here, Unix milliseconds, and from which peer.
    pub heard_ms: i64,
    pub via: Option<NodeId>,
    /// When a bundle from it was last imported here, Unix milliseconds.
    pub bundle_ms: Option<i64>,
}

impl Store {
    /// Change the row of `node` with `update`, creating it if the table has room. Returns
    /// whether it was written (false: a newer record is kept, or the table is full).
    pub fn update_fleet(
        &self,
        node: &NodeId,
        update: impl FnOnce(&mut FleetRow) -> bool,
    ) -> Result<bool, StoreError> {
        let ctx = "recording a fleet status";
        let tx = self.begin_lazy_write(ctx)?;
        let written = {
            let mut table = tx.open_table(FLEET).ctx(self, ctx)?;
            let old = match table.get(node.0).ctx(self, ctx)? {
                Some(v) => {
                    Some(self.decode::<FleetRow>(|| format!("fleet_v1[{node}]"), v.value())?)
                }
                None => None,
            };
            use redb::ReadableTableMetadata;
            if old.is_none() && table.len().ctx(self, ctx)? >= MAX_FLEET_NODES {
                false
            } else {
                let mut row = old.unwrap_or_default();
                if update(&mut row) {
                    let bytes = postcard::to_stdvec(&row).map_err(|e| self.encode_error(e))?;
                    table.insert(node.0, bytes.as_slice()).ctx(self, ctx)?;
                    true
                } else {
                    false
                }
            }
        };
        tx.commit().ctx(self, ctx)?;
        Ok(written)
    }

    /// Every node of the fleet table.
    pub fn fleet(&self) -> Result<Vec<(NodeId, FleetRow)>, StoreError> {
        let ctx = "reading the fleet table";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let table = tx.open_table(FLEET).ctx(self, ctx)?;
        let mut out = Vec::new();
        for item in table.iter().ctx(self, ctx)? {
            let (k, v) = item.ctx(self, ctx)?;
            let node = NodeId(k.value());
            out.push((
                node,
                self.decode(|| format!("fleet_v1[{node}]"), v.value())?,
            ));
        }
        Ok(out)
    }
}

/// Bytes sent to each peer today, for its daily budget (see [`crate::link`]).
/// Key: peer NodeId. Value: postcard [`crate::link::Meter`].
pub(super) const METERS: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("meters_v1");

impl Store {
    /// The bytes sent to `peer` on the day the meter last counted.
    pub fn meter(&self, peer: &NodeId) -> Result<crate::link::Meter, StoreError> {
        let ctx = "reading a peer's meter";
        let tx = self.db.begin_read().ctx(self, ctx)?;
        let table = tx.open_table(METERS).ctx(self, ctx)?;
        match table.get(peer.0).ctx(self, ctx)? {
            Some(v) => self.decode(|| format!("meters_v1[{peer}]"), v.value()),
            None => Ok(crate::link::Meter::default()),
        }
    }

    /// Count `bytes` sent to `peer` on `day` (its link's day, [`crate::link::Link::day`]),
    /// durably (a restart keeps the day's count).
    pub fn meter_sent(&self, peer: &NodeId, day: i64, bytes: u64) -> Result<(), StoreError> {
        let ctx = "counting bytes sent to a peer";
        let tx = self.db.begin_write().ctx(self, ctx)?;
        {
            let mut table = tx.open_table(METERS).ctx(self, ctx)?;
            let old = match table.get(peer.0).ctx(self, ctx)? {
                Some(v) => self.decode(|| format!("meters_v1[{peer}]"), v.value())?,
                None => crate::link::Meter::default(),
            };
            let mut meter = old.on_day(day);
            meter.bytes = meter.bytes.saturating_add(bytes);
            let encoded = postcard::to_stdvec(&meter).map_err(|e| self.encode_error(e))?;
            table.insert(peer.0, encoded.as_slice()).ctx(self, ctx)?;
        }
        tx.commit().ctx(self, ctx)
    }
}
