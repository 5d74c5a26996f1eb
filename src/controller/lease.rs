//! Leader election: a Lease in flotilla's namespace, held by one replica at a time. Only the
//! leader writes; followers compute the same state, so a take-over writes at once.

use std::sync::Arc;

use kube::Client;
use tokio::sync::Notify;
use tokio::sync::mpsc::UnboundedSender;

use super::{Input, LeaseOptions};
use crate::meta::MANAGER;

/// Takes part in the election and reports every change of leadership as `Input::Leader`. When
/// `stop` is notified the lease is released, so that another replica takes over without waiting
/// for it to expire.
pub async fn spawn(
    hub: Client,
    namespace: &str,
    lease: &LeaseOptions,
    tx: UnboundedSender<Input>,
    stop: Arc<Notify>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let manager = kube_lease_manager::LeaseManagerBuilder::new(hub, &lease.name)
        .with_namespace(namespace)
        .with_identity(&lease.identity)
        .with_duration(lease.duration_seconds)
        .with_grace(lease.grace_seconds)
        .with_field_manager(MANAGER)
        .build()
        .await
        .map_err(|e| anyhow::anyhow!("lease {namespace}/{}: {e}", lease.name))?;
    let (mut leader, manager_task) = manager.watch().await;
    Ok(tokio::spawn(async move {
        let _ = tx.send(Input::Leader(*leader.borrow()));
        loop {
            tokio::select! {
                changed = leader.changed() => {
                    if changed.is_err() || tx.send(Input::Leader(*leader.borrow())).is_err() {
                        break;
                    }
                }
                _ = stop.notified() => break,
            }
        }
        // Dropping the receiver makes the manager release the lease and end.
        drop(leader);
        let _ = manager_task.await;
    }))
}
