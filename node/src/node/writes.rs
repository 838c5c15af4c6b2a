//! The node actor's group commit: a local put or delete and those queued behind it,
//! committed together in one durable transaction.

use super::{Action, MAX_GROUP_WRITES, NodeActor, log_refused};

impl NodeActor {
    /// Group commit: `first` (a put or a delete) and the puts and deletes queued behind it,
    /// up to [`MAX_GROUP_WRITES`], committed in one durable transaction; each writer is
    /// answered once the commit holding its write is done. An action of another kind ends
    /// the group and runs after it.
    pub(super) fn on_writes(&mut self, first: Action) {
        let mut ops = Vec::new();
        let mut replies = Vec::new();
        let mut next = Some(first);
        let mut after = None;
        while let Some(action) = next.take() {
            let (op, reply) = match action {
                Action::Put {
                    ty,
                    id,
                    fields,
                    reply,
                } => ((ty, id, crate::core::GroupOp::Put(fields)), reply),
                Action::Delete { ty, id, reply } => ((ty, id, crate::core::GroupOp::Delete), reply),
                other => {
                    after = Some(other);
                    break;
                }
            };
            ops.push(op);
            replies.push(reply);
            if ops.len() < MAX_GROUP_WRITES {
                next = self.rx.try_recv().ok();
            }
        }
        let started = std::time::Instant::now();
        let answers = self.core.write_group(&ops);
        let took = started.elapsed().as_secs_f64();
        for (answer, reply) in answers.into_iter().zip(replies) {
            self.timers.write.observe(took);
            log_refused(&answer);
            let _ = reply.send(answer);
        }
        if let Some(action) = after {
            self.on_action(action);
        }
    }
}
