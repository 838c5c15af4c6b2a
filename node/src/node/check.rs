//! The pipelined receive path's first stage: a peer's batch has its signatures verified on
//! the way to the node actor, on a thread of its own, so batch N+1 is verified while the
//! actor applies and commits batch N (the sender keeps [`crate::sync::SYNC_WINDOW_BATCHES`]
//! in flight).

use tokio::sync::{mpsc, oneshot};

use crate::core::Checked;
use crate::fault::Faults;
use crate::netloop::NetEvent;
use tidesync_proto::Message;

/// Events verified and waiting for the node actor. One: besides the batch the actor is
/// storing, the stage holds at most two verified batches (one queued, one waiting to be).
pub const CHECKED_QUEUE_LEN: usize = 1;

/// A network event on its way to the actor, with its batch's signatures when they were
/// verified ahead (see [`Checked`]).
pub(super) type Checking = (NetEvent, Option<Checked>);

/// One batch for the verifier thread, and where its message goes back with the results.
type Job = (Message, oneshot::Sender<(Message, Option<Checked>)>);

/// Pass every event of `events` on, in order, to the receiver this returns. A peer's batch
/// of at least [`crate::replica::receive::MIN_CHECKED_AHEAD_CHANGES`] goes once the
/// verifier thread has checked its signatures; every other event goes at once, unless a
/// batch is ahead of it. Ends when either side closes.
pub(super) fn spawn(
    mut events: mpsc::Receiver<NetEvent>,
    faults: Faults,
) -> mpsc::Receiver<Checking> {
    let (tx, rx) = mpsc::channel(CHECKED_QUEUE_LEN);
    let (jobs, job_rx) = mpsc::channel::<Job>(CHECKED_QUEUE_LEN);
    let verifier = std::thread::Builder::new()
        .name("tidesync-verify".into())
        .spawn(move || verify_loop(job_rx, faults));
    if let Err(e) = &verifier {
        // Without the thread, the actor verifies every batch itself, as before.
        tracing::warn!(error = %e, "could not start the thread that verifies batches ahead of the node actor; the actor verifies them");
    }
    let mut ahead = verifier.is_ok();
    let stage = async move {
        while let Some(event) = events.recv().await {
            let checking = match event {
                NetEvent::Request { peer, id, msg } if ahead && Checked::wanted(&msg) => {
                    let (back, answer) = oneshot::channel();
                    // From here on, should the verifier thread be gone, the actor verifies.
                    if let Err(mpsc::error::SendError((msg, _))) = jobs.send((msg, back)).await {
                        ahead = false;
                        (NetEvent::Request { peer, id, msg }, None)
                    } else {
                        match answer.await {
                            Ok((msg, checked)) => (NetEvent::Request { peer, id, msg }, checked),
                            // The thread ended while verifying (nothing here lets it): the
                            // request is lost with it, and the peer sends the batch again.
                            Err(_) => {
                                tracing::error!(%peer, "the thread verifying batches stopped; the peer sends this batch again");
                                ahead = false;
                                continue;
                            }
                        }
                    }
                }
                other => (other, None),
            };
            if tx.send(checking).await.is_err() {
                break;
            }
        }
    };
    tokio::spawn(tracing::Instrument::in_current_span(stage));
    rx
}

/// The verifier thread, one thread at normal priority. One is enough: it verifies a batch in
/// less time than the actor takes to store one, and spread over every core it only took CPU
/// from the actor's apply stage. At the lowest priority (Linux's idle class) it was faster on
/// an idle machine and six times slower on a busy one (README, "The pipelined receive path").
fn verify_loop(mut jobs: mpsc::Receiver<Job>, faults: Faults) {
    while let Some((msg, back)) = jobs.blocking_recv() {
        // A panic while verifying leaves the batch unchecked: the actor verifies it itself.
        let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Checked::of_message(&msg, &faults)
        }))
        .ok()
        .flatten();
        let _ = back.send((msg, checked));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stage keeps the network's order: a later event never overtakes a batch being
    /// verified, and the batch comes with its signatures checked.
    #[tokio::test]
    async fn events_pass_in_order_and_a_batch_comes_with_its_signatures() {
        let (cores, batch) = crate::core::sync_tests::a_first_batch();
        let peer = cores[0].node_id();
        let (tx, rx) = mpsc::channel(8);
        let mut out = spawn(rx, Faults::default());
        let ack = Message::Ack {
            batch: 0,
            upto: 0,
            rejected: 0,
        };
        for event in [
            NetEvent::Request {
                peer,
                id: 1,
                msg: batch,
            },
            NetEvent::Disconnected(peer),
            NetEvent::Request {
                peer,
                id: 2,
                msg: ack,
            },
        ] {
            tx.send(event).await.expect("the stage takes events");
        }
        drop(tx);
        assert!(matches!(
            out.recv().await,
            Some((NetEvent::Request { id: 1, .. }, Some(_)))
        ));
        assert!(matches!(
            out.recv().await,
            Some((NetEvent::Disconnected(p), None)) if p == peer
        ));
        assert!(matches!(
            out.recv().await,
            Some((NetEvent::Request { id: 2, .. }, None))
        ));
        assert!(out.recv().await.is_none(), "the stage ends with its input");
    }
}
